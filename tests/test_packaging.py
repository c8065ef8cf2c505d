"""The core package stays free of the Hugging Face stack; the integrations map where documented."""

from __future__ import annotations

import subprocess
import sys


def test_core_import_loads_no_hugging_face_package():
    code = (
        "import sys, torch_crisp, torch_crisp.functional, torch_crisp.persistence, torch_crisp.distributed\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in {'transformers', 'peft', 'accelerate'})\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_integrations_folder_is_importable_as_a_subpackage():
    import torch_crisp.integrations.hf_trainer as hf_trainer

    assert hf_trainer.__file__.replace("\\\\", "/").endswith("integrations/hf_trainer.py")
    assert hasattr(hf_trainer, "CrispCallback")
