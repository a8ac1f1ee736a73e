"""The installed layout: one import root, three sub-packages, a version."""

import importlib
import os

import tensorbus


def test_version_and_subpackages():
    assert isinstance(tensorbus.__version__, str) and tensorbus.__version__.count(".") == 2
    folders = {
        "tensorbus._core": "_core",
        "tensorbus.broker": "broker",
        "tensorbus.clients": "clients",
    }
    for module, folder in folders.items():
        mod = importlib.import_module(module)
        assert os.path.basename(os.path.dirname(mod.__file__)) == folder
        assert isinstance(mod.__all__, list)


def test_core_public_api_is_complete():
    core = importlib.import_module("tensorbus._core")
    for name in core.__all__:
        assert hasattr(core, name), name
