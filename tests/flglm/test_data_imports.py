"""`flglm.data` is a package of modules; the torch-free ones and the lazy facade must not import torch."""

import importlib
import subprocess
import sys

import flglm.data


def test_the_torch_free_data_modules_and_facade_names_do_not_import_torch() -> None:
    script = (
        "import sys\n"
        "import flglm.data.files, flglm.data.batches, flglm.data.client_dirs\n"
        "from flglm.data import DataError, Example, batch_at, load_examples, read_data_dir\n"
        "import apps.cli.agent\n"
        "assert 'torch' not in sys.modules, 'torch imported by a torch-free data module or the agent CLI'\n"
        "from flglm.data import collate\n"
        "assert 'torch' in sys.modules\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr


def test_every_facade_name_is_its_module_s_object() -> None:
    for name in flglm.data.__all__:
        module = importlib.import_module(f"flglm.data.{flglm.data._EXPORTS[name]}")
        assert getattr(flglm.data, name) is getattr(module, name)
