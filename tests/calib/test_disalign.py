import json

import numpy as np
import pytest
import torch

from calib.bank import load_bank, write_bank
from calib.disalign import DEFAULT_RHO, DisAlign
from calib.errors import ArtifactError, InputError, NotFittedError
from calib.methods import load_calibration
from calib.metrics import mean_class_accuracy
from calib.synthetic import write_synthetic_bank
from tests.conftest import LT_COUNTS


def mca(est, bank):
    return mean_class_accuracy(est.predict(bank.features.float(), bank.logits), bank.labels, bank.num_classes)


@pytest.fixture(scope="module")
def fitted(lt_banks):
    return DisAlign(rho="auto", rho_grid=(0.0, 1.0, 2.0), epochs=4).fit(lt_banks["train"], val=lt_banks["val"])


def test_fit_balances_a_biased_classifier(fitted, lt_banks):
    test = load_bank(lt_banks["test"])
    joint = mean_class_accuracy(test.logits.argmax(1), test.labels, 10)
    assert mca(fitted, test) > joint + 0.05


def test_rho_auto_records_the_curve_and_picks_the_best_validation_point(fitted):
    report = fitted.meta_.report
    assert [p["rho"] for p in report["rho_curve"]] == [0.0, 1.0, 2.0]
    best = max(report["rho_curve"], key=lambda p: (p["val_mean_class_accuracy"], -p["val_nll"]))
    assert report["rho"] == best["rho"] and report["validation"] == best
    assert report["rho"] > 0  # re-weighting must help on a long-tailed bank


def test_rho_auto_without_validation_uses_documented_default(lt_banks):
    est = DisAlign(rho="auto", epochs=1).fit(lt_banks["train"])
    assert est.meta_.report["rho"] == DEFAULT_RHO and len(est.meta_.report["rho_curve"]) == 1


def test_fit_is_deterministic(lt_banks):
    a = DisAlign(rho=1.0, epochs=2).fit(lt_banks["train"])
    b = DisAlign(rho=1.0, epochs=2).fit(lt_banks["train"])
    for name in a.params_:
        assert torch.equal(a.params_[name], b.params_[name])


def test_save_load_round_trip_is_exact(fitted, lt_banks, tmp_path):
    fitted.save(tmp_path / "cal")
    assert sorted(p.name for p in (tmp_path / "cal").iterdir()) == ["calibration.json", "parameters.safetensors"]
    meta = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert meta["method"] == "disalign" and meta["num_classes"] == 10 and meta["feature_dim"] == 32
    assert meta["hyperparameters"]["rho"] == "auto" and meta["model_fingerprint"].startswith("sha256:")
    loaded = load_calibration(tmp_path / "cal")
    assert isinstance(loaded, DisAlign)
    test = load_bank(lt_banks["test"])
    assert torch.equal(loaded.predict_logits(test.features.float(), test.logits), fitted.predict_logits(test.features.float(), test.logits))
    assert torch.allclose(loaded.predict_proba(test.features.float(), test.logits).sum(1), torch.ones(test.num_rows))


def test_artifact_mismatch_is_refused(fitted):
    with pytest.raises(ArtifactError, match="the calibration has K=10 classes but the model has K=11"):
        fitted.check_compatible(num_classes=11, feature_dim=32)
    with pytest.raises(ArtifactError, match="the calibration has d=32 features but the model has d=64"):
        fitted.check_compatible(num_classes=10, feature_dim=64)
    with pytest.raises(ArtifactError, match="fitted for model sha256:synthetic"):
        fitted.check_compatible(num_classes=10, feature_dim=32, model_fingerprint="sha256:other")


def test_corrupt_artifacts_fail_clearly(fitted, tmp_path):
    with pytest.raises(ArtifactError, match="is not a calibration directory"):
        load_calibration(tmp_path)
    fitted.save(tmp_path / "cal")
    (tmp_path / "cal" / "parameters.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="is not a readable safetensors file"):
        load_calibration(tmp_path / "cal")


def test_predict_input_errors(fitted):
    with pytest.raises(InputError, match=r"logits should have shape \(N, 10\), found \(4, 9\)"):
        fitted.predict_logits(torch.zeros(4, 32), torch.zeros(4, 9))
    with pytest.raises(InputError, match=r"features should have shape \(N, 32\), found \(4, 31\)"):
        fitted.predict_logits(torch.zeros(4, 31), torch.zeros(4, 10))
    with pytest.raises(InputError, match="features have 3 rows but logits have 4"):
        fitted.predict_logits(torch.zeros(3, 32), torch.zeros(4, 10))
    with pytest.raises(InputError, match="found NaN or inf"):
        fitted.predict_logits(torch.full((1, 32), float("nan")), torch.zeros(1, 10))
    with pytest.raises(NotFittedError, match="not fitted yet"):
        DisAlign().predict_logits(torch.zeros(1, 32), torch.zeros(1, 10))


def test_bad_hyper_parameters_and_banks(lt_banks, tmp_path):
    with pytest.raises(InputError, match="rho should be a number >= 0 or 'auto', found 'best'"):
        DisAlign(rho="best").fit(lt_banks["train"])
    write_bank(tmp_path / "k4.h5", np.zeros((3, 32)), np.zeros((3, 4)), [0, 1, 2])
    with pytest.raises(InputError, match="val bank .* has K=4 classes but the training bank has K=10"):
        DisAlign().fit(lt_banks["train"], val=tmp_path / "k4.h5")
    write_bank(tmp_path / "empty.h5", np.zeros((3, 2)), np.zeros((3, 3)), [0, 1, 0], class_counts=[2, 1, 0])
    with pytest.raises(InputError, match=r"class\(es\) \[2\] have no training samples"):
        DisAlign(rho=1.0).fit(tmp_path / "empty.h5")


def test_ablations_freeze_their_terms(lt_banks):
    no_magnitude = DisAlign(rho=1.0, epochs=1, use_magnitude=False).fit(lt_banks["train"])
    assert torch.equal(no_magnitude.params_["alpha"], torch.zeros(10))
    no_margin = DisAlign(rho=1.0, epochs=1, use_margin=False).fit(lt_banks["train"])
    assert torch.equal(no_margin.params_["beta"], torch.zeros(10))
    no_grw = DisAlign(rho="auto", epochs=1, use_grw=False).fit(lt_banks["train"], val=lt_banks["val"])
    assert no_grw.meta_.report["rho"] == 0.0


def test_background_column_is_never_calibrated(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=400)
    z = rng.normal(size=(400, 4)).astype(np.float32) + np.eye(4)[y] * 2
    write_bank(tmp_path / "det.h5", rng.normal(size=(400, 8)), z, y, task="detection", background_index=0, class_counts=[10_000, 50, 20, 5])
    est = DisAlign(rho=1.0, epochs=2).fit(tmp_path / "det.h5")
    assert est.meta_.background_index == 0
    out = est.predict_logits(torch.randn(5, 8), torch.from_numpy(z[:5]))
    assert torch.equal(out[:, 0], torch.from_numpy(z[:5, 0]))


def test_streaming_fit_under_a_memory_budget(lt_banks, tmp_path):
    in_memory = DisAlign(rho=1.0, epochs=3).fit(lt_banks["train"])
    same = DisAlign(rho=1.0, epochs=3).fit(lt_banks["train"], max_memory=1 << 30)  # fits: loaded, identical
    assert torch.equal(same.params_["alpha"], in_memory.params_["alpha"])
    # 1,397 rows of 104 bytes in chunks of 128 rows; 100 kB leaves two windows (one training, one being read) of 2 chunks.
    small_chunks = write_synthetic_bank(tmp_path / "train.h5", LT_COUNTS // 10, feature_dim=32, separation=1.5, chunk_rows=128)
    streamed = DisAlign(rho=1.0, epochs=3).fit(small_chunks, max_memory=100_000)
    assert streamed.meta_.report["streamed"]["window_rows"] == 288
    test = load_bank(lt_banks["test"])
    assert mca(streamed, test) > mca(in_memory, test) - 0.03
