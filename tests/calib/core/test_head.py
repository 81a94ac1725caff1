import math

import pytest
import torch
import torch.nn.functional as F

from disalign.calib.core.head import (
    GateCoordinates,
    align_logits,
    batch_norm,
    batch_norm_grads,
    confidence_gate,
    disalign_logits,
    fold_batch_norm,
    grw_loss_and_grads,
    initial_parameters,
    linear_gate,
    linear_gate_grads,
)


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


def test_blend_form_is_eq5_of_the_paper():
    # ẑ = σ(α⊙z + β) + (1 − σ)z: row 1 with σ = .75, α = [2, 1, 3], β = [0, 1, -1], z = [1, 2, 3]
    # = .75·[2, 3, 8] + .25·[1, 2, 3] = [1.75, 2.75, 6.75]
    logits, gate = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([0.75])
    alpha, beta = torch.tensor([2.0, 1.0, 3.0]), torch.tensor([0.0, 1.0, -1.0])
    assert torch.allclose(align_logits(logits, gate, alpha, beta, blend=True), torch.tensor([[1.75, 2.75, 6.75]]))
    # at the official init (α = 1, β = 0) the blend head is the identity whatever the gate
    assert torch.equal(align_logits(logits, gate, torch.ones(3), torch.zeros(3), blend=True), logits)


def test_head_matches_reference_disalign_fast_rcnn_output_layers():
    """cvpods DisAlignFastRCNNOutputLayers: foreground scores σ(s·scale + bias) + (1 − σ)s, background (last) as is."""
    torch.manual_seed(0)
    x, scores = torch.randn(16, 8), torch.randn(16, 6)
    confidence_layer = torch.nn.Linear(8, 1)
    scale, bias = torch.randn(5), torch.randn(5)
    with torch.no_grad():
        confidence = confidence_layer(x).sigmoid()
        fg = confidence * (scores[:, :-1] * scale + bias) + (1 - confidence) * scores[:, :-1]
        reference = torch.cat([fg, scores[:, -1:]], dim=1)
        ours = disalign_logits(x, scores, torch.cat([scale, torch.ones(1)]), torch.cat([bias, torch.zeros(1)]),
                               confidence_layer.weight[0], confidence_layer.bias[0], blend=True, background_index=5)
    assert torch.allclose(ours, reference, atol=1e-6)


def test_relu_gate_is_sigmoid_of_relu():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gate = confidence_gate(x, torch.tensor([-2.0, 1.0]), torch.tensor(0.0), relu=True)
    assert torch.allclose(gate, torch.tensor([0.5, torch.sigmoid(torch.tensor(1.0))]))  # ReLU(-2) = 0 → σ = 0.5


@pytest.mark.parametrize("blend", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("background_index", [None, 2])
@pytest.mark.parametrize("heads_per_group", [None, 2])
def test_stacked_loss_and_hand_written_gradients_match_autograd(blend, relu, background_index, heads_per_group, monkeypatch):
    if heads_per_group:  # the groups a large (B, K) splits the heads into
        monkeypatch.setattr("disalign.calib.core.head.HEAD_GROUP_FLOATS", heads_per_group * 9 * 5)
    torch.manual_seed(0)
    heads, rows, k, d = 3, 9, 5, 4
    x, z = torch.randn(rows, d, dtype=torch.float64), torch.randn(rows, k, dtype=torch.float64) * 3
    y = torch.randint(0, k, (rows,))
    params = {"alpha": torch.randn(heads, k, dtype=torch.float64), "beta": torch.randn(heads, k, dtype=torch.float64),
              "gate_weight": torch.randn(heads, d, dtype=torch.float64), "gate_bias": torch.randn(heads, dtype=torch.float64)}
    weights = torch.rand(heads, rows, dtype=torch.float64) + 0.1
    u = linear_gate(x, params["gate_weight"], params["gate_bias"])
    loss, grads = grw_loss_and_grads(u, z, y, params["alpha"], params["beta"], weights, blend=blend, relu_gate=relu,
                                     background_index=background_index)
    grads["gate_weight"], grads["gate_bias"] = linear_gate_grads(x, grads.pop("preactivation"))
    leaf = {name: t.clone().requires_grad_(True) for name, t in params.items()}
    reference = torch.stack([
        (F.cross_entropy(disalign_logits(x, z, *(leaf[n][r] for n in ("alpha", "beta", "gate_weight", "gate_bias")), blend=blend,
                                         relu_gate=relu, background_index=background_index), y, reduction="none") * weights[r]).sum()
        / weights[r].sum() for r in range(heads)])
    reference.sum().backward()  # heads share no parameter: the sum's gradient is each head's own
    assert torch.allclose(loss, reference)
    for name in params:
        assert torch.allclose(grads[name], leaf[name].grad), name


def test_loss_stays_exact_when_the_label_probability_underflows():
    z = torch.tensor([[200.0, 0.0], [0.0, 1.0]])
    loss, _ = grw_loss_and_grads(torch.zeros(1, 2), z, torch.tensor([1, 1]), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2))
    assert torch.allclose(loss, F.cross_entropy(z, torch.tensor([1, 1])).reshape(1))  # (200 + ln(1 + e^-200) + 0.3133) / 2


def test_gate_coordinates_change_nothing_but_the_parametrisation():
    torch.manual_seed(0)
    x = torch.rand(50, 6) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0, 0.0]) + 2.0  # last dimension constant
    coords = GateCoordinates.standardizing(x)
    x_std = (x - coords.mean) * coords.scale
    assert torch.allclose(x_std[:, :5].std(0, unbiased=False), torch.full((5,), 1 / 6**0.5), atol=1e-5)
    assert float(coords.scale[5]) == 0.0  # a constant dimension carries nothing: its value lives in the bias
    v, c = torch.randn(2, 6), torch.randn(2)
    raw_v, raw_c = coords.to_raw(v, c)
    assert torch.allclose(x @ raw_v.T + raw_c, x_std @ v.T + c, atol=1e-5)
    back_v, back_c = coords.from_raw(raw_v, raw_c)
    assert torch.allclose(x @ coords.to_raw(back_v, back_c)[0].T + coords.to_raw(back_v, back_c)[1], x @ raw_v.T + raw_c, atol=1e-4)
    # the chain rule through to_raw, against autograd
    leaf_v, leaf_c = v.clone().requires_grad_(True), c.clone().requires_grad_(True)
    upstream_v, upstream_c = torch.randn(2, 6), torch.randn(2)
    rv, rc = coords.to_raw(leaf_v, leaf_c)
    ((rv * upstream_v).sum() + (rc * upstream_c).sum()).backward()
    dv, dc = coords.grads_from_raw(upstream_v, upstream_c)
    assert torch.allclose(dv, leaf_v.grad) and torch.allclose(dc, leaf_c.grad)


def test_official_gate_initialisations():
    g = torch.Generator().manual_seed(0)
    normal = initial_parameters(3, 4000, form="blend", gate="normal", generator=g)
    assert abs(float(normal["gate_weight"].std()) - 0.01) < 0.001 and float(normal["gate_bias"]) == 0.0
    assert torch.equal(normal["alpha"], torch.ones(3)) and torch.equal(normal["beta"], torch.zeros(3))
    bn = initial_parameters(3, 4000, form="blend", gate="bn-relu", generator=g)
    assert abs(float(bn["gate_weight"].std()) - 2**0.5) < 0.05  # Kaiming normal, fan-out 1
    assert float(bn["bn_weight"]) == 1.0 and float(bn["bn_bias"]) == 0.0 and float(bn["gate_bias"]) == 0.0


def test_batch_norm_matches_torch_in_training_mode_and_its_backward_matches_autograd():
    torch.manual_seed(0)
    a = torch.randn(3, 20, dtype=torch.float64)
    gamma, bias = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    u, cache = batch_norm(a, gamma, bias)
    reference = F.batch_norm(a.T, None, None, gamma, bias, training=True, eps=1e-5).T  # rows = batch, columns = heads
    assert torch.allclose(u, reference)
    leaf = [t.clone().requires_grad_(True) for t in (a, gamma, bias)]
    upstream = torch.randn(3, 20, dtype=torch.float64)
    (F.batch_norm(leaf[0].T, None, None, leaf[1], leaf[2], training=True, eps=1e-5).T * upstream).sum().backward()
    for mine, t in zip(batch_norm_grads(upstream, gamma, cache), leaf, strict=True):
        assert torch.allclose(mine, t.grad)


def test_folded_batch_norm_is_batch_norm_in_evaluation_mode():
    torch.manual_seed(0)
    x, v, c = torch.randn(50, 4), torch.randn(2, 4), torch.randn(2)
    gamma, bias = torch.tensor([1.5, 0.5]), torch.tensor([0.2, -0.1])
    a = linear_gate(x, v, c)  # (2, 50)
    mean, var = a.mean(1), a.var(1, unbiased=False)
    folded_v, folded_c = fold_batch_norm(v, c, gamma, bias, mean, var)
    evaluation = F.batch_norm(a.T, mean, var, gamma, bias, training=False, eps=1e-5).T
    assert torch.allclose(linear_gate(x, folded_v, folded_c), evaluation, atol=1e-5)


def test_heads_without_the_magnitude_term_skip_it_and_match_the_full_computation():
    torch.manual_seed(0)
    heads, rows, k = 5, 8, 6
    z, y = torch.randn(rows, k, dtype=torch.float64) * 2, torch.randint(0, k, (rows,))
    u, weights = torch.randn(heads, rows, dtype=torch.float64), torch.rand(heads, rows, dtype=torch.float64) + 0.1
    alpha, beta = torch.randn(heads, k, dtype=torch.float64), torch.randn(heads, k, dtype=torch.float64)
    magnitude = torch.tensor([True, True, False, False, True])
    alpha[~magnitude] = 1.0  # blend heads without α: α = 1, i.e. α' = 0
    loss, grads = grw_loss_and_grads(u, z, y, alpha, beta, weights, blend=True, background_index=0, magnitude=magnitude)
    full_loss, full = grw_loss_and_grads(u, z, y, alpha, beta, weights, blend=True, background_index=0)
    assert torch.allclose(loss, full_loss)
    assert torch.allclose(grads["beta"], full["beta"]) and torch.allclose(grads["preactivation"], full["preactivation"])
    assert torch.allclose(grads["alpha"][magnitude], full["alpha"][magnitude])
    assert torch.equal(grads["alpha"][~magnitude], torch.zeros(2, k))
