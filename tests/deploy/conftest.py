"""The deployment tests use the service tests' shared model and real CIFAR JPEGs."""

from tests.service.conftest import cifar_jpegs, model_file  # noqa: F401  (fixtures)
