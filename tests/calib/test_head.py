import math

import torch

from calib.head import align_logits, confidence_gate, disalign_logits, initial_parameters


def test_gate_is_sigmoid_of_affine_feature():
    gate = confidence_gate(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([math.log(3.0), 0.0]), torch.tensor(0.0))
    assert torch.allclose(gate, torch.tensor([0.75, 0.5]))


def test_cosine_gate_normalises_features_first():
    x = torch.tensor([[3.0, 4.0]])
    v = torch.tensor([1.0, 1.0])
    assert torch.allclose(confidence_gate(x, v, torch.tensor(0.0), cosine=True), torch.sigmoid(torch.tensor([1.4])))


def test_aligned_logits_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 3.0], [2.0, 0.0, -1.0]])
    gate = torch.tensor([0.75, 0.5])
    alpha, beta = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.0, 1.0, -1.0])
    # row 1: (1 + .75·[1,2,0])·[1,2,3] + .75·[0,1,-1] = [1.75, 5.75, 2.25]
    # row 2: (1 + .5·[1,2,0])·[2,0,-1] + .5·[0,1,-1]  = [3.0, 0.5, -1.5]
    expected = torch.tensor([[1.75, 5.75, 2.25], [3.0, 0.5, -1.5]])
    assert torch.allclose(align_logits(logits, gate, alpha, beta), expected)


def test_background_logit_is_untouched():
    logits = torch.tensor([[1.0, 2.0, 3.0], [2.0, 0.0, -1.0]])
    gate = torch.tensor([0.75, 0.5])
    out = align_logits(logits, gate, torch.tensor([1.0, 2.0, 7.0]), torch.tensor([0.0, 1.0, -4.0]), background_index=2)
    assert torch.equal(out[:, 2], logits[:, 2])
    assert torch.allclose(out[:, :2], torch.tensor([[1.75, 5.75], [3.0, 0.5]]))


def test_head_matches_reference_disalign_linear():
    """cvpods DisAlignLinear: (1 + σ·logit_scale)·fc(x) + σ·logit_bias with σ = sigmoid(confidence_layer(x))."""
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    fc = torch.nn.Linear(8, 5)
    confidence_layer = torch.nn.Linear(8, 1)
    scale, bias = torch.randn(1, 5), torch.randn(1, 5)
    with torch.no_grad():
        confidence = confidence_layer(x).sigmoid()
        reference = (1 + confidence * scale) * fc(x) + confidence * bias
        ours = disalign_logits(x, fc(x), scale[0], bias[0], confidence_layer.weight[0], confidence_layer.bias[0])
    assert torch.allclose(ours, reference, atol=1e-6)


def test_initialisation_matches_reference():
    p = initial_parameters(3, 4)
    assert torch.equal(p["alpha"], torch.ones(3))
    assert torch.equal(p["beta"], torch.zeros(3))
    assert torch.equal(p["gate_weight"], torch.full((4,), 0.1))
    assert float(p["gate_bias"]) == 0.0


def test_float16_features_are_upcast():
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float16)
    out = disalign_logits(x, torch.tensor([[1.0, 0.0]]), torch.ones(2), torch.zeros(2), torch.zeros(2), torch.tensor(0.0))
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([[1.5, 0.0]]))


def test_hand_written_backward_matches_autograd_of_the_formula():
    torch.manual_seed(0)
    x = torch.randn(6, 4, dtype=torch.float64)
    z = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    params = [torch.randn(5, dtype=torch.float64, requires_grad=True) for _ in range(2)] + [
        torch.randn(4, dtype=torch.float64, requires_grad=True), torch.randn((), dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda z, a, b, v, c: disalign_logits(x, z, a, b, v, c), (z, *params))
    upstream = torch.randn(6, 5, dtype=torch.float64)
    ours = torch.autograd.grad((disalign_logits(x, z, *params) * upstream).sum(), [z, *params])
    a, b, v, c = params
    g = torch.sigmoid(x @ v + c).unsqueeze(1)
    reference = torch.autograd.grad((((1 + g * a) * z + g * b) * upstream).sum(), [z, *params])
    for mine, ref in zip(ours, reference, strict=True):
        assert torch.allclose(mine, ref)


def test_prediction_path_equals_the_training_path():
    # Without gradients the head skips the autograd.Function; both paths must give the same logits.
    torch.manual_seed(1)
    x, z = torch.randn(7, 4), torch.randn(7, 5)
    a, b, v = torch.randn(5), torch.randn(5), torch.randn(4)
    c = torch.tensor(0.3)
    trained = disalign_logits(x, z, a.requires_grad_(), b, v, c)
    assert trained.grad_fn is not None
    with torch.inference_mode():
        predicted = disalign_logits(x, z, a, b, v, c, background_index=None)
    assert predicted.grad_fn is None
    assert torch.equal(predicted, trained.detach())
