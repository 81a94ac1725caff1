"""The baselines: known answers on hand cases, gains on a long-tailed bank, artifacts and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from disalign.calib.artifact.publish import PARAMETERS_FILE, artifact_dir
from disalign.calib.core.metrics import mean_class_accuracy, negative_log_likelihood
from disalign.calib.data.bank import load_bank, write_bank
from disalign.calib.errors import ArtifactError, InputError, NotFittedError
from disalign.calib.estimators.baselines import CRT, LWS, NCM, TDE, Joint, LogitAdjustment, TauNorm
from disalign.calib.estimators.baselines.ncm import ABSENT_LOGIT
from disalign.calib.estimators.methods import BASELINE_NAMES, METHODS, load_calibration

BASELINES = {name: METHODS[name] for name in BASELINE_NAMES}


def tiny_bank(path, features, logits, labels, **kwargs):
    features = np.asarray(features, dtype=np.float32)
    return load_bank(write_bank(path, features, np.asarray(logits, dtype=np.float32), np.asarray(labels, dtype=np.int64),
                                feature_dtype="float32", **kwargs))


def mca_of(est, bank) -> float:
    """Mean-class accuracy of an estimator on a bank."""
    z = est.predict_logits(bank.features, bank.logits)
    return mean_class_accuracy(z.argmax(1), bank.labels, bank.num_classes)


@pytest.fixture(scope="module")
def fitted(long_tailed_banks):
    """Every baseline fitted on the long-tailed train bank with validation (default hyper-parameters)."""
    b = long_tailed_banks
    return {name: cls().fit(b.train, b.val) for name, cls in BASELINES.items()}


def test_all_baselines_are_registered():
    assert set(BASELINES) == {"joint", "logit-adjust", "tau-norm", "lws", "crt", "ncm", "tde"}
    assert all(METHODS[name].method == name for name in METHODS)  # each class's name is its key in the one list
    assert tuple(METHODS) == ("joint", "disalign", *BASELINE_NAMES[1:])


# -- known answers on hand cases ------------------------------------------------------------------
def test_joint_returns_the_stage1_logits(long_tailed_banks):
    b = long_tailed_banks
    est = Joint().fit(b.train)
    assert torch.equal(est.predict_logits(b.test.features, b.test.logits), b.test.logits)
    assert est.params_ == {} and est.get_params() == {}


def test_logit_adjustment_tau_one_subtracts_log_priors(tmp_path):
    logits = [[2.0, 1.0, 0.5], [0.1, 0.2, 0.3]]
    bank = tiny_bank(tmp_path / "t.h5", [[0.0], [0.0]], logits, [0, 1], class_counts=[6, 3, 1])
    est = LogitAdjustment(tau=1.0).fit(bank)
    expected = torch.tensor(logits) - torch.log(torch.tensor([0.6, 0.3, 0.1]))
    assert torch.allclose(est.predict_logits(bank.features, bank.logits), expected, atol=1e-6)
    half = LogitAdjustment(tau=0.5).fit(bank).predict_logits(bank.features, bank.logits)
    assert torch.allclose(half, torch.tensor(logits) - 0.5 * torch.log(torch.tensor([0.6, 0.3, 0.1])), atol=1e-6)


def test_logit_adjustment_auto_uses_one_without_val_and_the_grid_with_val(long_tailed_banks):
    b = long_tailed_banks
    assert LogitAdjustment().fit(b.train).meta_.report["tau"] == 1.0
    est = LogitAdjustment().fit(b.train, b.val)
    curve = est.meta_.report["tau_curve"]
    assert [p["tau"] for p in curve] == [round(0.1 * i, 10) for i in range(31)]
    best = max(curve, key=lambda p: (p["val_mean_class_accuracy"], -p["val_nll"]))
    assert est.meta_.report["tau"] == best["tau"] == float(est.params_["tau"])
    assert best["val_mean_class_accuracy"] > curve[0]["val_mean_class_accuracy"]  # τ = 0 is the stage-1 model


def test_tau_norm_tau_zero_is_the_linear_layer_without_bias_and_tau_one_is_scaled_cosine(tmp_path):
    weight = np.array([[3.0, 4.0], [0.0, 2.0]], dtype=np.float32)  # norms 5 and 2
    features = [[1.0, 1.0], [2.0, -1.0]]
    bank = tiny_bank(tmp_path / "t.h5", features, [[0.0, 0.0], [0.0, 0.0]], [0, 1],
                     classifier_weight=weight, classifier_bias=np.array([1.0, -1.0], dtype=np.float32))
    zero = TauNorm(tau=0.0).fit(bank).predict_logits(bank.features, bank.logits)
    assert torch.allclose(zero, torch.tensor([[7.0, 2.0], [2.0, -2.0]]))
    one = TauNorm(tau=1.0).fit(bank).predict_logits(bank.features, bank.logits)
    assert torch.allclose(one, torch.tensor([[7 / 5, 1.0], [2 / 5, -1.0]]))
    x = bank.features
    cosine = torch.nn.functional.cosine_similarity(x[:, None, :], torch.from_numpy(weight)[None], dim=2)
    assert torch.allclose(one, cosine * x.norm(dim=1, keepdim=True))


def test_tau_norm_computes_fp16_features_in_float32(long_tailed_banks):
    b = long_tailed_banks
    assert b.test.features.dtype == torch.float16
    z = TauNorm(tau=0.0).fit(b.train).predict_logits(b.test.features, b.test.logits)
    assert z.dtype == torch.float32
    # τ = 0 is x·Wᵀ: the stored logits minus the bias, up to float32 rounding
    assert torch.allclose(z, b.test.logits - torch.from_numpy(b.bias), atol=1e-4)


def test_tau_norm_auto_and_reconstruction_report(long_tailed_banks, fitted):
    report = fitted["tau-norm"].meta_.report
    assert report["logit_reconstruction_error"] < 1e-5
    assert [p["tau"] for p in report["tau_curve"]] == [round(0.1 * i, 10) for i in range(21)]
    assert TauNorm().fit(long_tailed_banks.train).meta_.report["tau"] == 1.0


def test_tau_norm_without_classifier_weights_says_so(tmp_path):
    bank = tiny_bank(tmp_path / "t.h5", [[1.0]], [[0.0, 1.0]], [1])
    with pytest.raises(InputError, match=r"has no classifier weights .* re-extract the bank with a model whose final linear layer is reachable"):
        TauNorm().fit(bank)


def test_ncm_on_separable_points(tmp_path):
    # centred by the mean (0, 0), the four classes sit at the unit vectors e1, −e1, e2, −e2
    train = tiny_bank(tmp_path / "train.h5", [[2, 0], [-2, 0], [0, 2], [0, -2], [4, 0], [-4, 0], [0, 4], [0, -4]],
                      np.zeros((8, 4)), [0, 1, 2, 3, 0, 1, 2, 3])
    test = tiny_bank(tmp_path / "test.h5", [[3, 0.5], [-1, 0.2], [0.3, 5], [-0.1, -0.4]], np.zeros((4, 4)), [0, 1, 2, 3])
    est = NCM().fit(train)
    assert torch.allclose(est.params_["centroids"], torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]]))
    z = est.predict_logits(test.features, test.logits)
    assert z.argmax(1).tolist() == [0, 1, 2, 3]
    x = torch.nn.functional.normalize(test.features, dim=1)
    centroids = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]])
    assert torch.allclose(z, -(2 - 2 * x @ centroids.T), atol=1e-6)  # −‖x̂ − c‖² for unit vectors, T = 1


def test_ncm_class_without_training_rows_is_never_predicted(tmp_path):
    train = tiny_bank(tmp_path / "train.h5", [[1, 0], [-1, 0]], np.zeros((2, 3)), [0, 1])
    z = NCM().fit(train).predict_logits(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 3))
    assert z[0, 2] == ABSENT_LOGIT and z.argmax(1).item() != 2


def test_ncm_temperature_minimises_validation_nll(long_tailed_banks, fitted):
    est = fitted["ncm"]
    t = float(est.params_["temperature"])
    assert t == est.meta_.report["temperature"] and 0 < t < 1  # distances on the unit sphere are small
    b = long_tailed_banks
    neg_distance = NCM(temperature=1.0).fit(b.train).predict_logits(b.val.features, b.val.logits)
    nll = [negative_log_likelihood(neg_distance / s, b.val.labels) for s in (t, 0.8 * t, 1.25 * t)]
    assert nll[0] < nll[1] and nll[0] < nll[2]


# -- learned baselines ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["logit-adjust", "tau-norm", "lws", "crt", "ncm", "tde"])
def test_baseline_improves_mean_class_accuracy_over_joint(long_tailed_banks, fitted, name):
    b = long_tailed_banks
    joint = mca_of(fitted["joint"], b.test)
    assert joint < 0.65  # the stage-1 model is biased toward the head classes
    assert mca_of(fitted[name], b.test) > joint + 0.1


def test_lws_scales_start_at_one_and_shrink_the_head(fitted):
    scales = fitted["lws"].params_["scales"]
    assert scales.shape == (7,) and scales[0] < scales[-1]
    assert fitted["lws"].meta_.report["train_loss"][-1] < fitted["lws"].meta_.report["train_loss"][0]


def test_lws_and_crt_are_seeded(long_tailed_banks):
    b = long_tailed_banks
    a, c = CRT(epochs=2, seed=3).fit(b.train), CRT(epochs=2, seed=3).fit(b.train)
    assert torch.equal(a.params_["weight"], c.params_["weight"])
    assert not torch.equal(a.params_["weight"], CRT(epochs=2, seed=4).fit(b.train).params_["weight"])
    assert torch.equal(LWS(epochs=1, seed=1).fit(b.train).params_["scales"], LWS(epochs=1, seed=1).fit(b.train).params_["scales"])


def test_recipes_default_to_classifier_balancing():
    assert LWS().get_params() == {"epochs": 5, "batch_size": 512, "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4,
                                  "samples_per_class": 4, "epoch_size": "sampler", "max_steps": None, "seed": 0}
    assert CRT().get_params()["epochs"] == 10


def test_epoch_plan_is_the_samplers_length_or_the_datasets_full_batches_capped_by_max_steps():
    # ImageNet-LT: 115,846 images, max_j n_j = 1,280, 1,000 classes
    assert CRT().epoch_plan(115_846, 1_280_000) == (1_280_000, 2_500)
    assert CRT(epoch_size="dataset").epoch_plan(115_846, 1_280_000) == (226 * 512, 226)  # int(N / batch), run_networks.py
    assert CRT(max_steps=1_000).epoch_plan(115_846, 1_280_000) == (100 * 512, 100)  # every epoch shortened alike
    assert CRT(max_steps=30_000).epoch_plan(115_846, 1_280_000) == (1_280_000, 2_500)  # under the cap: untouched
    assert LWS(epoch_size="dataset").epoch_plan(100, 40) == (512, 1)  # fewer images than a batch: one batch


def test_lws_trains_the_sampler_length_with_an_epoch_wise_cosine(long_tailed_banks):
    b = long_tailed_banks  # 7 classes, the largest has 400 images: 2,800 draws per epoch, 6 batches of 512
    report = LWS(epochs=4).fit(b.train).meta_.report
    assert report["sampler_length"] == report["draws_per_epoch"] == 2_800 and report["steps_per_epoch"] == 6
    assert report["epoch_lr"] == pytest.approx([0.2 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)])


# -- artifacts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(BASELINES))
def test_save_load_round_trip_is_exact(long_tailed_banks, fitted, tmp_path, name):
    est, b = fitted[name], long_tailed_banks
    est.save(tmp_path / name)
    for loaded in (type(est).load(tmp_path / name), load_calibration(tmp_path / name)):
        assert type(loaded) is type(est)
        assert loaded.get_params() == est.get_params()
        assert loaded.meta_.report == est.meta_.report
        assert torch.equal(loaded.predict_logits(b.test.features, b.test.logits), est.predict_logits(b.test.features, b.test.logits))


@pytest.mark.parametrize("name", [n for n in BASELINES if n != "joint"])
def test_load_rejects_a_parameter_of_the_wrong_shape(fitted, tmp_path, name):
    directory = fitted[name].save(tmp_path / name)
    files = artifact_dir(directory)
    params = load_file(str(files / PARAMETERS_FILE))
    first = sorted(params)[0]
    params[first] = torch.zeros(*params[first].shape, 2) if params[first].ndim else torch.zeros(2)
    save_file(params, str(files / PARAMETERS_FILE))
    with pytest.raises(ArtifactError, match=rf"{name} calibration: parameter '{first}' should have shape"):
        load_calibration(directory)


@pytest.mark.parametrize("name", list(BASELINES))
def test_use_before_fit_is_a_clear_error(name, tmp_path):
    est = BASELINES[name]()
    with pytest.raises(NotFittedError, match=rf"this {type(est).__name__} is not fitted yet; call fit\(\) or load\(\) first"):
        est.predict_logits(torch.zeros(1, 2), torch.zeros(1, 3))
    with pytest.raises(NotFittedError):
        est.save(tmp_path / "x")


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("est", "message"),
    [
        (LogitAdjustment(tau="best"), r"tau should be a number >= 0 or 'auto', found 'best'\."),
        (LogitAdjustment(tau=-1), r"tau should be a number >= 0 or 'auto', found -1\."),
        (LogitAdjustment(tau_grid=[]), r"tau_grid should hold at least one value, found an empty grid\."),
        (TauNorm(tau_grid=[0.0, math.nan]), r"tau_grid should hold finite numbers >= 0, found nan\."),
        (TauNorm(tau=math.inf), r"tau should be a number >= 0 or 'auto', found inf\."),
        (NCM(temperature=0), r"temperature should be a number > 0 or 'auto', found 0\."),
        (NCM(temperature=-2.0), r"temperature should be a number > 0 or 'auto', found -2.0\."),
        (LWS(epochs=0), r"epochs should be an integer >= 1, found 0\."),
        (CRT(lr=0), r"lr should be > 0, found 0\."),
        (CRT(epoch_size="all"), r"epoch_size should be one of sampler, dataset, found 'all'\."),
        (LWS(max_steps=0), r"max_steps should be an integer >= 1 or None, found 0\."),
        (LWS(samples_per_class=2.5), r"samples_per_class should be an integer >= 1, found 2\.5\."),
        (TDE(alpha=-0.5), r"alpha should be a number >= 0 or 'auto', found -0\.5\."),
    ],
)
def test_bad_hyperparameters_are_named(long_tailed_banks, est, message):
    with pytest.raises(InputError, match=message):
        est.fit(long_tailed_banks.train, long_tailed_banks.val)


def test_val_bank_without_clean_labelled_rows(long_tailed_banks, tmp_path):
    b = long_tailed_banks
    val = load_bank(write_bank(tmp_path / "val.h5", b.val.features.numpy(), b.val.logits.numpy(), np.full(b.val.num_rows, -1),
                               class_counts=b.counts, model_fingerprint=b.train.info.model_fingerprint))
    with pytest.raises(InputError, match=r"val bank .*val\.h5 has no labelled rows in its clean view \(view 0\)\."):
        LogitAdjustment().fit(b.train, val)


# -- banks with a background column (RoI banks) ---------------------------------------------------
@pytest.fixture(scope="module")
def roi_banks(tmp_path_factory):
    """K = 4 with background 0 (training count 0 by convention), a biased linear stage-1 classifier."""
    directory = tmp_path_factory.mktemp("roi_banks")
    rng = np.random.default_rng(7)
    means = np.abs(rng.normal(size=(4, 6))) + np.eye(4, 6) * 2.5
    weight = (means * np.array([1.5, 1.4, 1.0, 0.7])[:, None]).astype(np.float32)
    bias = np.array([1.0, 0.5, -0.5, -1.0], dtype=np.float32)
    banks = {}
    for split, rows in (("train", [300, 60, 20, 6]), ("val", [40, 20, 20, 20]), ("test", [40, 20, 20, 20])):
        labels = np.repeat(np.arange(4), rows)
        features = (means[labels] + rng.normal(size=(labels.size, 6))).astype(np.float32)
        banks[split] = tiny_bank(directory / f"{split}.h5", features, features @ weight.T + bias, labels,
                                 class_counts=[0, 60, 20, 6], background_index=0, classifier_weight=weight, classifier_bias=bias,
                                 model_fingerprint="sha256:roi-test")
    return banks


@pytest.mark.parametrize("name", list(BASELINES))
def test_every_baseline_leaves_the_background_logit_untouched(roi_banks, name):
    est = BASELINES[name]().fit(roi_banks["train"], roi_banks["val"])
    test = roi_banks["test"]
    z = est.predict_logits(test.features, test.logits)
    assert torch.equal(z[:, 0], test.logits[:, 0])
    assert torch.equal(type(est).load(est.save(test.info.path + f".{name}")).predict_logits(test.features, test.logits), z)


def test_logit_adjustment_uses_foreground_priors_on_roi_banks(tmp_path):
    logits = [[3.0, 2.0, 1.0, 0.5], [0.0, 0.1, 0.2, 0.3]]
    bank = tiny_bank(tmp_path / "t.h5", [[0.0], [0.0]], logits, [0, 1], class_counts=[0, 6, 3, 1], background_index=0)
    z = LogitAdjustment(tau=1.0).fit(bank).predict_logits(bank.features, bank.logits)
    # π over the foreground classes only; the background logit as it was (a count of 0 counted as 1
    # would raise it by log(11) and make every region background)
    assert torch.allclose(z, torch.tensor(logits) - torch.log(torch.tensor([1.0, 0.6, 0.3, 0.1])), atol=1e-6)


def test_lws_and_crt_store_the_unused_background_parameters_plainly(roi_banks):
    assert LWS(epochs=1).fit(roi_banks["train"]).params_["scales"][0] == 1.0
    crt = CRT(epochs=1).fit(roi_banks["train"]).params_
    assert not crt["weight"][0].any() and crt["bias"][0] == 0.0


# -- Deconfound-TDE -------------------------------------------------------------------------------
def test_tde_removes_alpha_times_the_projection_on_the_mean_feature_direction(long_tailed_banks):
    b = long_tailed_banks
    est = TDE(alpha=0.7).fit(b.train)
    x = b.train.features.double()
    direction = x.mean(0) / x.mean(0).norm()
    assert torch.allclose(est.params_["direction"].double(), direction, atol=1e-6)
    # direct computation: the counterfactual feature through the stage-1 linear layer
    xt = b.test.features.double()
    counterfactual = xt - 0.7 * (xt @ direction).unsqueeze(1) * direction
    expected = counterfactual @ torch.from_numpy(b.weight).double().T + torch.from_numpy(b.bias).double()
    assert torch.allclose(est.predict_logits(b.test.features, b.test.logits).double(), expected, atol=1e-3)
    assert torch.equal(TDE(alpha=0.0).fit(b.train).predict_logits(b.test.features, b.test.logits), b.test.logits)


def official_tde(x, w, embed, alpha, scale=16.0, gamma=0.0):
    """The ``use_effect`` branch of CausalNormClassifier.forward with one head (the official code, transcribed)."""
    normed_w = w / (w.norm(dim=1, keepdim=True) + gamma)
    nx = x / x.norm(dim=1, keepdim=True)
    nc = embed / embed.norm()
    cos_val = (nx * nc).sum(-1, keepdim=True) / nx.norm(dim=1, keepdim=True) / nc.norm()
    return ((nx - cos_val * alpha * nc) * scale) @ normed_w.T


def test_tde_is_the_official_counterfactual_on_a_normalised_classifier(tmp_path):
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(5, 8))
    weight = (weight / np.linalg.norm(weight, axis=1, keepdims=True) * 2.0).astype(np.float32)  # equal norms, no bias
    train_x = np.abs(rng.normal(size=(50, 8))).astype(np.float32)
    test_x = np.abs(rng.normal(size=(20, 8))).astype(np.float32)
    labels = rng.integers(0, 5, 50)
    train = tiny_bank(tmp_path / "train.h5", train_x, train_x @ weight.T, labels, classifier_weight=weight)
    ours = TDE(alpha=1.5).fit(train).predict_logits(torch.from_numpy(test_x), torch.from_numpy(test_x @ weight.T))
    x = torch.from_numpy(test_x).double()
    reference = official_tde(x, torch.from_numpy(weight).double(), torch.from_numpy(train_x).double().mean(0), 1.5)
    # the same logits up to the positive per-row factor ‖x‖·‖w‖/τ that the official form divides out
    assert torch.allclose(ours.double(), reference * x.norm(dim=1, keepdim=True) * 2.0 / 16.0, atol=1e-4)


def test_tde_on_roi_banks_keeps_the_background_probability_as_the_official_keep_fg(roi_banks):
    train, test = roi_banks["train"], roi_banks["test"]
    est = TDE(alpha=1.2).fit(train)
    foreground = train.features[train.labels != 0].double()
    assert torch.allclose(est.params_["direction"].double(), foreground.mean(0) / foreground.mean(0).norm(), atol=1e-6)
    z = test.logits.double()
    y0 = 1.2 * (test.features.double() @ est.params_["direction"].double()).unsqueeze(1) * est.params_["class_effect"].double()
    old, new = z.softmax(-1), (z - y0).softmax(-1)  # the official KEEP_FG rule (background first here)
    final_fg = old[:, 1:].sum(-1, keepdim=True) / new[:, 1:].sum(-1, keepdim=True) * new[:, 1:]
    expected = torch.cat([old[:, :1], final_fg], dim=1)
    assert torch.allclose(est.predict_proba(test.features, test.logits).double(), expected, atol=1e-5)


def test_tde_chooses_alpha_on_val_and_needs_classifier_weights(long_tailed_banks, fitted, tmp_path):
    report = fitted["tde"].meta_.report
    assert [p["alpha"] for p in report["alpha_curve"]] == [round(0.1 * i, 10) for i in range(31)]
    assert report["alpha"] == max(report["alpha_curve"], key=lambda p: (p["val_mean_class_accuracy"], -p["val_nll"]))["alpha"]
    assert TDE().fit(long_tailed_banks.train).meta_.report["alpha"] == 1.0
    bank = tiny_bank(tmp_path / "t.h5", [[1.0]], [[0.0, 1.0]], [1])
    with pytest.raises(InputError, match=r"has no classifier weights .*, which tde needs"):
        TDE().fit(bank)
