"""instance_norm_act: the Triton kernels and the PyTorch path against an fp64 torch.group_norm.

On a CPU-only machine the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set in
tests/conftest.py, with MAMBA_DENSE_TRITON_CPU=1 set here). Outputs are poisoned with NaN so an
element the kernels forget to write fails the comparison. The ``small_tiles`` fixture shrinks the
tiles so that tiny shapes still get several tiles per split, several splits per row, masked tile
tails and masked channel blocks.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from mamba_dense.kernels import instance_norm as inorm
from mamba_dense.kernels.instance_norm import instance_norm_act

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRET, reason="needs a GPU or TRITON_INTERPRET=1 (set by tests/conftest.py)"
)
CL3D = torch.channels_last_3d
SHAPES = [(2, 3, 5, 6, 7), (2, 6, 2, 1, 3), (1, 4, 1, 1, 1)]  # the last: one voxel per channel


@pytest.fixture(autouse=True)
def _triton_on_cpu(monkeypatch):
    monkeypatch.setenv("MAMBA_DENSE_TRITON_CPU", "1")
    monkeypatch.setenv("MAMBA_DENSE_POISON", "1")


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(inorm, "TILE", 32)
    monkeypatch.setattr(inorm, "MAX_BLOCK_C", 4)
    monkeypatch.setattr(inorm, "_num_sms", lambda dev: 2)  # aim for 16 programs
    monkeypatch.setattr(inorm, "BLOCK_R", 4)  # finalize: several programs, a masked row tail,
    monkeypatch.setattr(inorm, "BLOCK_SPLIT", 2)  # several chunk blocks per row and a masked chunk tail


def _rel(a, b):
    """Relative Frobenius error; absolute below a reference norm of 1e-6 (zero gradients)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 1e-6))


def _inputs(shape, dtype, layout, affine=(True, True), seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 + 3.0).to(device, dtype)
    x = x.contiguous(memory_format=layout)
    w, b = (torch.randn(shape[1], generator=g).to(device) + 1.0 if on else None for on in affine)
    return x, w, b


def _ref(x, w, b, act, eps=1e-5, slope=0.01):
    """fp64 instance norm written out (torch.group_norm's CUDA backward with a bias but no weight
    raises "tensor does not have a device" in torch 2.11, so the reference does not use it)."""
    xd = x.double()
    dims = tuple(range(2, x.dim()))
    mean = xd.mean(dims, keepdim=True)
    var = (xd - mean).square().mean(dims, keepdim=True)
    y = (xd - mean) / torch.sqrt(var + eps)
    shape = (1, -1) + (1,) * len(dims)
    if w is not None:
        y = y * w.double().view(shape)
    if b is not None:
        y = y + b.double().view(shape)
    return {"none": y, "relu": F.relu(y), "leaky_relu": F.leaky_relu(y, slope)}[act]


def _check(x, w, b, act, tol, dy_seed=1):
    """Output and gradients of x, weight, bias against the fp64 reference on the same inputs."""
    leaves = {k: t.detach().requires_grad_() for k, t in zip("xwb", (x, w, b)) if t is not None}
    y = instance_norm_act(leaves["x"], leaves.get("w"), leaves.get("b"), act=act)
    g = torch.Generator().manual_seed(dy_seed)
    dy = torch.randn(y.shape, generator=g).to(y.device, y.dtype)
    grads = torch.autograd.grad(y, list(leaves.values()), dy)
    ref = {k: t.detach().double().requires_grad_() for k, t in leaves.items()}
    y_ref = _ref(ref["x"], ref.get("w"), ref.get("b"), act)
    g_ref = torch.autograd.grad(y_ref, list(ref.values()), dy.double())
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.isfinite(y).all()
    assert _rel(y, y_ref) < tol
    for t, gt, gr in zip(leaves.values(), grads, g_ref):
        assert gt.dtype == t.dtype and torch.isfinite(gt).all()
        assert _rel(gt, gr) < tol
    return y, grads


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL3D], ids=["ncdhw", "ndhwc"])
def test_small_tiles_split_the_rows(layout, small_tiles):
    """The tests below do exercise several splits per row, several tiles per split, a partial last tile."""
    x = torch.empty(2, 3, 5, 6, 7).contiguous(memory_format=layout)
    p = inorm._plan(*inorm._layout(x))
    assert p.n_split > 1 and p.tiles_per_split > 1 and p.S % p.block_s != 0


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("act", ["none", "relu", "leaky_relu"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL3D], ids=["ncdhw", "ndhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_matches_reference(shape, layout, act, dtype, tol, small_tiles):
    x, w, b = _inputs(shape, dtype, layout)
    y, (dx, _, _) = _check(x, w, b, act, tol)
    assert y.is_contiguous(memory_format=layout) and dx.is_contiguous(memory_format=layout)


@needs_triton
@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)], ids=["none", "weight", "bias"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL3D], ids=["ncdhw", "ndhwc"])
def test_optional_affine(layout, affine, small_tiles):
    x, w, b = _inputs((2, 6, 2, 1, 3), torch.float32, layout, affine, seed=2)
    _check(x, w, b, "leaky_relu", 1e-4)


@needs_triton
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL3D], ids=["ncdhw", "ndhwc"])
def test_default_tiles(layout):
    x, w, b = _inputs((2, 3, 5, 6, 7), torch.float32, layout, seed=3)
    _check(x, w, b, "relu", 1e-4)


@needs_triton
def test_other_ranks_and_layouts(small_tiles):
    """Rank 3 and 4, channels-last of any rank (a transposed (B, L, C)), and a layout that is
    neither (made contiguous)."""
    g = torch.Generator().manual_seed(4)
    x3 = (torch.randn(2, 9, 5, generator=g) + 3.0).to(DEVICE)
    x4 = (torch.randn(2, 5, 4, 3, generator=g) + 3.0).to(DEVICE).contiguous(memory_format=torch.channels_last)
    x5 = (torch.randn(2, 3, 5, 6, 4, generator=g) + 3.0).to(DEVICE).transpose(2, 4)
    for x in (x3, x3.transpose(1, 2).contiguous().transpose(1, 2), x4, x5):
        w, b = torch.rand(x.shape[1]).to(DEVICE), torch.randn(x.shape[1]).to(DEVICE)
        _check(x, w, b, "leaky_relu", 1e-4)


@needs_triton
def test_large_mean_is_stable(small_tiles):
    """Chan's merge: a mean 1000 x the std costs no precision (E[x^2] - E[x]^2 in fp32 is off by ~1e-2)."""
    for layout in (torch.contiguous_format, CL3D):
        x, w, b = _inputs((2, 3, 5, 6, 7), torch.float32, layout, seed=5)
        x = (x + 1000.0).contiguous(memory_format=layout)
        y = instance_norm_act(x, w, b)
        assert _rel(y, _ref(x, w, b, "none")) < 1e-4


@needs_triton
def test_gradcheck_fp64(small_tiles):
    x, w, b = _inputs((2, 3, 4, 5), torch.float64, torch.channels_last, seed=6)
    w, b = w.double(), b.double()
    args = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(
        lambda *a: instance_norm_act(*a, act="leaky_relu", negative_slope=0.2), args, fast_mode=True
    )


@needs_triton
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL3D], ids=["ncdhw", "ndhwc"])
def test_torch_path_matches_triton(layout, monkeypatch, small_tiles):
    """CPU tensors without MAMBA_DENSE_TRITON_CPU take torch.group_norm: the same numbers."""
    outs = []
    for use_triton, device in ((False, "cpu"), (True, DEVICE)):
        monkeypatch.setenv("MAMBA_DENSE_TRITON_CPU", "1" if use_triton else "0")
        x, w, b = _inputs((2, 3, 5, 6, 7), torch.float32, layout, seed=7, device=device)
        y, grads = _check(x, w, b, "relu", 1e-4)
        assert y.is_contiguous(memory_format=layout)
        outs.append([t.cpu() for t in (y, *grads)])
    for a, b in zip(*outs):
        assert _rel(a, b) < 1e-5


def test_bf16_torch_path_keeps_dtype(monkeypatch):
    monkeypatch.setenv("MAMBA_DENSE_TRITON_CPU", "0")
    x, w, b = _inputs((2, 3, 4, 4, 4), torch.bfloat16, CL3D, device="cpu")
    y = instance_norm_act(x, w, b, act="relu")
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=CL3D)
    assert _rel(y, _ref(x, w, b, "relu")) < 2e-2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(x=torch.zeros(2, 3)), "x must be"),
        (dict(x=torch.zeros(2, 3, 4, dtype=torch.int32)), "x has unsupported dtype"),
        (dict(weight=torch.ones(4)), r"weight must .* \(3,\)"),
        (dict(bias=torch.ones(3, 1)), r"bias must .* \(3,\)"),
        (dict(act="gelu"), "act must be one of"),
    ],
)
def test_bad_inputs(kwargs, match):
    args = dict(x=torch.randn(2, 3, 4, 4, 4), weight=None, bias=None, act="none") | kwargs
    with pytest.raises(ValueError, match=match):
        instance_norm_act(**args)


@needs_triton
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL3D], ids=["ncdhw", "ndhwc"])
def test_registered_ops_pass_opcheck(layout, small_tiles):
    """The custom ops' schema, fake implementations (shapes, dtypes, strides), autograd registration
    and dispatch agree with the kernels (torch.library.opcheck)."""
    x, w, b = _inputs((2, 3, 5, 6, 7), torch.float32, layout, seed=3)
    x.requires_grad_()
    torch.library.opcheck(inorm._fwd_op, (x, w.requires_grad_(), b.requires_grad_(), 1e-5, "leaky_relu", 0.01))
    torch.library.opcheck(inorm._fwd_op, (x, None, None, 1e-5, "none", 0.01))
    y, mean, rstd = inorm._fwd_op(x.detach(), w.detach(), b.detach(), 1e-5, "relu", 0.01)
    dy = torch.randn_like(y)
    for need_dx in (True, False):
        torch.library.opcheck(inorm._bwd_op, (dy, x.detach(), w.detach(), mean, rstd, b.detach(), "relu", 0.01, need_dx))


@needs_triton
def test_compiles_without_graph_break_and_matches_eager(small_tiles):
    """A GSC block (four fused norms) traces as one graph (fullgraph=True): the norm is an opaque op
    for torch.compile, not a graph break, and gives eager's outputs and gradients."""
    from mamba_dense.encoders.volumetric import GSC

    torch.manual_seed(0)
    m = GSC(4).to(DEVICE)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True, dynamic=False)
    x = torch.randn(2, 4, 5, 4, 6, device=DEVICE, requires_grad=True)
    y = compiled(x)
    g = torch.autograd.grad(y.square().sum(), [x, m.proj.weight])
    x2 = x.detach().clone().requires_grad_()
    y2 = m(x2)
    g2 = torch.autograd.grad(y2.square().sum(), [x2, m.proj.weight])
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-6)
    for a, b in zip(g, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_triton
def test_strided_or_expanded_affine_parameters(small_tiles):
    """The kernels read weight[c] / bias[c] at ptr + c: strided ([::2]) or expanded (stride 0) parameters
    gave wrong numbers, and the expanded weight was read past its one-element storage."""
    x, _, _ = _inputs((2, 3, 4, 5, 6), torch.float64, torch.contiguous_format)
    t = torch.randn(6, dtype=torch.float64, device=DEVICE) + 1.0
    for w, b in ((t[::2], t[1::2]), (torch.full((1,), 2.0, dtype=torch.float64, device=DEVICE).expand(3), None)):
        assert not w.is_contiguous()
        _check(x, w, b, "relu", 1e-12)


def test_empty_inputs_and_meta_layout():
    """group_norm refused C = 0 or an empty spatial size (x.numel() == 0 went to it); on the meta device the
    channels-last layout was lost (meta went to group_norm, not to the op's fake)."""
    for shape in ((0, 3, 4), (2, 0, 4), (2, 3, 0), (2, 3, 4, 0)):
        assert instance_norm_act(torch.randn(shape)).shape == shape
    for shape in ((0, 3, 4), (2, 3, 0)):  # zero gradients for the affine parameters, not None
        w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
        instance_norm_act(torch.randn(shape, requires_grad=True), w, b).sum().backward()
        assert torch.equal(w.grad, torch.zeros(3)) and torch.equal(b.grad, torch.zeros(3))
    x = torch.empty(2, 3, 4, 5, 6, device="meta").contiguous(memory_format=CL3D)
    y = instance_norm_act(x, torch.ones(3, device="meta"), torch.zeros(3, device="meta"))
    assert y.device.type == "meta" and y.is_contiguous(memory_format=CL3D)
