"""A step-by-step float64 selective scan: the plainest statement of the operator's contract."""

import torch
import torch.nn.functional as F


def scan_loop(x, dt, A, B, C, D=None, dt_bias=None, *, route, merge="sum", dt_softplus=True):
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    batch, L, Dm = x.shape
    K, S = route.shape
    N = A.shape[-1]
    out = torch.zeros(batch, L, K, Dm, dtype=torch.float64)
    for k in range(K):
        h = torch.zeros(batch, Dm, N, dtype=torch.float64)
        for s in range(S):
            t = int(route[k, s])
            if t >= 0:
                xt, dtt, Bt, Ct = x[:, t], dt[:, t, k], B[:, t, k], C[:, t, k]
            else:  # padding step: a zero token
                xt = torch.zeros(batch, Dm, dtype=torch.float64)
                dtt = torch.zeros(batch, Dm, dtype=torch.float64)
                Bt = torch.zeros(batch, N, dtype=torch.float64)
                Ct = torch.zeros(batch, N, dtype=torch.float64)
            v = dtt + (dt_bias[k].double() if dt_bias is not None else 0.0)
            delta = F.softplus(v) if dt_softplus else v
            h = torch.exp(delta[..., None] * A[k][None]) * h + (delta * xt)[..., None] * Bt[:, None, :]
            if t >= 0:
                y = (h * Ct[:, None, :]).sum(-1)
                if D is not None:
                    y = y + D[k].double() * xt
                out[:, t, k] = y
    return out.sum(2) if merge == "sum" else out
