"""chunked_logprobs / topk_logprobs against the full-logits reference (naive_logprobs)."""
import pytest
import torch

from drpo.ops.logprob import chunked_logprobs, naive_logprobs, topk_logprobs

N, H, V = 37, 16, 301  # N prime: no chunk size below divides it


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make_inputs(dtype=torch.float32, n=N, with_bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 3).to(dtype)  # logits of O(3)
    bias = torch.randn(V, generator=g).to(dtype) if with_bias else None
    targets = torch.randint(0, V, (n,), generator=g)
    grad_out = torch.randn(n, generator=g)
    return hidden, weight, bias, targets, grad_out


def grads(fn, hidden, weight, bias, targets, grad_out, grad_entropy=None, **kw):
    """Outputs of fn and gradients of sum(g * log p) (+ sum(e * H)) wrt hidden, weight, bias."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    out = fn(*leaves, targets, bias=b, return_entropy=grad_entropy is not None, **kw)
    logp, entropy = out if grad_entropy is not None else (out, None)
    loss = (logp * grad_out.to(logp.dtype)).sum()
    if entropy is not None:
        loss = loss + (entropy * grad_entropy.to(entropy.dtype)).sum()
    loss.backward()
    return logp, entropy, leaves[0].grad, leaves[1].grad, None if b is None else b.grad


@pytest.mark.parametrize("chunk_size", [1, 8, 36, 37, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_matches_float64_reference(chunk_size, temperature, with_bias):
    inputs = make_inputs(with_bias=with_bias)
    ref = grads(naive_logprobs, *[None if t is None else t.double() for t in inputs[:3]],
                inputs[3], inputs[4].double(), temperature=temperature)
    got = grads(chunked_logprobs, *inputs, temperature=temperature, chunk_size=chunk_size)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    for name, g, r in zip(["logp", "entropy", "hidden", "weight", "bias"], got, ref):
        if r is not None:
            assert rel_err(g, r) < 1e-5, name


def test_fp32_matches_fp32_naive():
    inputs = make_inputs(with_bias=True)
    ref = grads(naive_logprobs, *inputs, temperature=0.8)
    got = grads(chunked_logprobs, *inputs, temperature=0.8, chunk_size=5)
    for name, g, r in zip(["logp", "entropy", "hidden", "weight", "bias"], got, ref):
        if r is not None:
            assert rel_err(g, r) < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    inputs = make_inputs(dtype=dtype, with_bias=True)
    got = grads(chunked_logprobs, *inputs, temperature=0.9, chunk_size=10)
    ref = grads(naive_logprobs, *inputs, temperature=0.9)
    # Both compute in float32 from the same rounded inputs: log-probs agree to float32 precision
    assert got[0].dtype == torch.float32
    assert rel_err(got[0], ref[0]) < 1e-5
    # Gradients come back in the inputs' dtype, equal up to one rounding of that dtype
    eps = torch.finfo(dtype).eps
    for name, g, r in zip(["hidden", "weight", "bias"], got[2:], ref[2:]):
        assert g.dtype == dtype, name
        assert rel_err(g, r) < 2 * eps, name
    # ...and close to the float64 gradient of the rounded inputs
    exact = grads(naive_logprobs, *[t.double() for t in inputs[:3]], inputs[3],
                  inputs[4].double(), temperature=0.9)
    for name, g, r in zip(["hidden", "weight", "bias"], got[2:], exact[2:]):
        assert rel_err(g, r) < 2 * eps, name


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_and_its_gradient(temperature):
    hidden, weight, bias, targets, grad_out = make_inputs(with_bias=True)
    grad_entropy = torch.randn(N, generator=torch.Generator().manual_seed(1))
    ref = grads(naive_logprobs, hidden.double(), weight.double(), bias.double(), targets,
                grad_out.double(), grad_entropy.double(), temperature=temperature)
    got = grads(chunked_logprobs, hidden, weight, bias, targets, grad_out, grad_entropy,
                temperature=temperature, chunk_size=6)
    for name, g, r in zip(["logp", "entropy", "hidden", "weight", "bias"], got, ref):
        assert rel_err(g, r) < 1e-5, name
    # entropy alone (no log-prob gradient) also backpropagates correctly
    h_ref = hidden.double().requires_grad_()
    naive_logprobs(h_ref, weight.double(), targets, return_entropy=True)[1].sum().backward()
    h = hidden.clone().requires_grad_()
    chunked_logprobs(h, weight, targets, return_entropy=True, chunk_size=4)[1].sum().backward()
    assert rel_err(h.grad, h_ref.grad) < 1e-5


def test_mask_zero_output_zero_grad_and_skips_padding_ids():
    hidden, weight, _, targets, grad_out = make_inputs()
    mask = torch.rand(N, generator=torch.Generator().manual_seed(2)) > 0.4
    assert 0 < mask.sum() < N
    padded = targets.masked_fill(~mask, -100)  # out of range, but masked out
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp = chunked_logprobs(h, w, padded, mask=mask, chunk_size=4)
    (logp * grad_out).sum().backward()
    assert torch.all(logp[~mask] == 0)
    assert torch.all(h.grad[~mask] == 0)
    assert h.grad[mask].abs().sum() > 0
    # unmasked rows equal the unmasked computation on those rows alone
    h_sub = hidden[mask].clone().requires_grad_()
    w_sub = weight.clone().requires_grad_()
    ref = naive_logprobs(h_sub, w_sub, targets[mask])
    (ref * grad_out[mask]).sum().backward()
    assert rel_err(logp[mask], ref) < 1e-6
    assert rel_err(h.grad[mask], h_sub.grad) < 1e-5
    assert rel_err(w.grad, w_sub.grad) < 1e-5


def test_all_masked_is_zero_and_differentiable():
    hidden, weight, _, targets, _ = make_inputs()
    h = hidden.clone().requires_grad_()
    logp = chunked_logprobs(h, weight, targets, mask=torch.zeros(N, dtype=torch.bool))
    logp.sum().backward()
    assert torch.all(logp == 0) and torch.all(h.grad == 0)


def test_leading_batch_dims():
    hidden, weight, _, targets, _ = make_inputs(n=24)
    h3, t3 = hidden.view(4, 6, H), targets.view(4, 6)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, -2:] = False
    logp, entropy = chunked_logprobs(h3, weight, t3, mask=mask, return_entropy=True, chunk_size=5)
    ref, ref_entropy = naive_logprobs(h3, weight, t3, mask=mask, return_entropy=True)
    assert logp.shape == (4, 6) and entropy.shape == (4, 6)
    assert rel_err(logp, ref) < 1e-6 and rel_err(entropy, ref_entropy) < 1e-6


def test_weight_without_grad_and_hidden_without_grad():
    hidden, weight, _, targets, grad_out = make_inputs()
    h = hidden.clone().requires_grad_()
    (chunked_logprobs(h, weight, targets) * grad_out).sum().backward()
    h_ref = hidden.double().requires_grad_()
    (naive_logprobs(h_ref, weight.double(), targets) * grad_out.double()).sum().backward()
    assert rel_err(h.grad, h_ref.grad) < 1e-5
    w = weight.clone().requires_grad_()
    (chunked_logprobs(hidden, w, targets) * grad_out).sum().backward()
    w_ref = weight.double().requires_grad_()
    (naive_logprobs(hidden.double(), w_ref, targets) * grad_out.double()).sum().backward()
    assert rel_err(w.grad, w_ref.grad) < 1e-5


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_topk_matches_log_softmax(temperature):
    hidden, weight, bias, _, _ = make_inputs(with_bias=True)
    ids = torch.randint(0, V, (N, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(N, dtype=torch.bool)
    mask[::3] = False
    got = topk_logprobs(hidden, weight, ids, temperature=temperature, bias=bias, mask=mask,
                        chunk_size=7)
    z = (hidden.double() @ weight.double().T + bias.double()) / temperature
    ref = torch.log_softmax(z, -1).gather(-1, ids)
    assert got.shape == (N, 5) and got.dtype == torch.float32
    assert torch.all(got[~mask] == 0)
    assert rel_err(got[mask], ref[mask]) < 1e-6


def test_topk_of_the_target_equals_chunked():
    hidden, weight, _, targets, _ = make_inputs()
    got = topk_logprobs(hidden.view(1, N, H), weight, targets.view(1, N, 1))
    assert torch.equal(got.view(N), chunked_logprobs(hidden, weight, targets))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": 2.5}, "chunk_size"),
        ({"targets": torch.full((N,), V)}, "token ids"),
        ({"targets": torch.full((N,), -1)}, "token ids"),
        ({"targets": torch.zeros(N + 1, dtype=torch.long)}, "targets shape"),
        ({"targets": torch.zeros(N)}, "integer"),
        ({"weight": torch.randn(V, H + 1)}, "weight"),
        ({"bias": torch.randn(V + 1)}, "bias"),
        ({"mask": torch.ones(N)}, "bool"),
        ({"mask": torch.ones(N + 1, dtype=torch.bool)}, "mask shape"),
    ],
)
def test_bad_input_raises(kwargs, message):
    hidden, weight, _, targets, _ = make_inputs()
    weight = kwargs.pop("weight", weight)
    targets = kwargs.pop("targets", targets)
    for fn in (chunked_logprobs, naive_logprobs):
        with pytest.raises(ValueError, match=message):
            fn(hidden, weight, targets, **kwargs)


def test_topk_bad_ids_raise():
    hidden, weight, _, _, _ = make_inputs()
    with pytest.raises(ValueError, match="ids shape"):
        topk_logprobs(hidden, weight, torch.zeros(N, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        topk_logprobs(hidden, weight, torch.full((N, 2), V))
