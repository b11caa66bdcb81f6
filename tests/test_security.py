"""Security properties checked on the source tree: no unsafe deserialisation, no remote code unless a
config turns it on, no shell strings (docs/security.md). Pure file and model checks; no Ray."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from stages.registry import _STAGES
from tests.conftest import ROOT

SOURCE_DIRS = ("pipeline", "stages", "benchmarks", "tests", "notebooks")
# pattern: what it catches. Each is matched on code with comments and string literals describing
# the rule allowed only where the line says why (see ALLOWED below).
FORBIDDEN = {
    r"torch\.load\((?![^)]*weights_only\s*=\s*True)": "torch.load without weights_only=True",
    r"\bpickle\.loads?\(": "pickle.load",
    r"\bcloudpickle\.loads?\(": "cloudpickle.load",
    r"\byaml\.load\(": "yaml.load (use yaml.safe_load)",
    r"\byaml\.unsafe_load\(|yaml\.UnsafeLoader|yaml\.FullLoader": "an unsafe YAML loader",
    r"trust_remote_code\s*=\s*True": "trust_remote_code=True as a literal",
    r"allow_pickle\s*=\s*True": "numpy allow_pickle=True",
    r"shell\s*=\s*True": "a shell string (shell=True)",
    r"\bos\.system\(|\bos\.popen\(": "a shell string (os.system / os.popen)",
    r"(?<![\w.])eval\(|(?<![\w.])exec\(": "eval / exec",
}
THIS_FILE = Path(__file__).resolve()


def source_files() -> list[Path]:
    files = []
    for folder in SOURCE_DIRS:
        root = ROOT / folder
        if root.is_dir():
            files += [p for p in root.rglob("*") if p.suffix in (".py", ".ipynb") and p.resolve() != THIS_FILE]
    return sorted(files)


def test_the_scan_sees_the_source_tree():
    files = {p.relative_to(ROOT).as_posix() for p in source_files()}
    assert {"pipeline/models/lm.py", "pipeline/engine/config.py", "stages/permute.py"} <= files


@pytest.mark.parametrize("pattern", sorted(FORBIDDEN))
def test_no_unsafe_loading_or_execution_in_the_source(pattern):
    hits = []
    for path in source_files():
        for number, text in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            code = text.split("#", 1)[0] if path.suffix == ".py" else text
            if re.search(pattern, code):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {text.strip()}")
    assert not hits, f"{FORBIDDEN[pattern]}:\n" + "\n".join(hits)


@pytest.mark.parametrize("snippet", [
    "torch.load(path)", "torch.load(path, map_location='cpu')", "pickle.load(fh)", "yaml.load(text)",
    "model = Auto.from_pretrained(x, trust_remote_code=True)", "subprocess.run(cmd, shell=True)",
    "np.load(p, allow_pickle=True)", "eval(expr)",
])
def test_each_pattern_catches_what_it_names(snippet):
    assert any(re.search(pattern, snippet) for pattern in FORBIDDEN), snippet
    assert not re.search(r"torch\.load\((?![^)]*weights_only\s*=\s*True)", "torch.load(p, weights_only=True)")
    assert not re.search(r"(?<![\w.])eval\(", "model.eval()")


def _trust_fields(model: type[BaseModel], prefix: str) -> list[tuple[str, object]]:
    found = []
    for name, field in model.model_fields.items():
        if name == "trust_remote_code":
            found.append((f"{prefix}{name}", field.default))
        annotation = field.annotation
        for candidate in getattr(annotation, "__args__", ()) or (annotation,):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                found += _trust_fields(candidate, f"{prefix}{name}.")
    return found


def test_trust_remote_code_is_off_unless_a_config_turns_it_on():
    from pipeline.train.config import TrainConfig

    fields = [f for stage in _STAGES.values() for f in _trust_fields(stage.Params, f"{stage.name}.")]
    fields += _trust_fields(TrainConfig, "train.")
    assert fields, "no trust_remote_code option found: the check would test nothing"
    assert all(default is False for _, default in fields), fields
