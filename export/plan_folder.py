"""The folder a TensorRT build writes (`python -m export trt`'s OUT): NAME.plan per graph, engines.json (the index
of what was built), the export's manifest.json and plugin/. A build stages everything in a folder inside OUT and
`publish` moves it in, plans first and the index last; a rebuild of some graphs reads the earlier index for its
targets and keeps the other graphs' plans when they were built alike."""
import json
import os
import shutil

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.exported import source_paths
from ipadapter_instruct.engine.trt.support import parse_cc

from ipadapter_instruct.export.controlnet import relocated
from ipadapter_instruct.export.onnx import source_entry


def write_atomic(path: str, data) -> None:
    """Write to a temporary file beside `path`, then rename: a failed write leaves nothing behind."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def earlier_index(out_dir: str) -> dict | None:
    try:
        with open(os.path.join(out_dir, "engines.json")) as f:
            before = json.load(f)
    except (OSError, ValueError):
        return None
    return before if isinstance(before, dict) else None


def earlier_targets(out_dir: str, package: str) -> list[int] | None:
    """The compute capabilities of the plans already in out_dir when `package` built them: a --graphs rebuild
    without --arch builds for those, so the other plans stay in the index."""
    t = (earlier_index(out_dir) or {}).get("tensorrt") or {}
    if t.get("package") != package or not t.get("compute_capabilities"):
        return None
    return [parse_cc(c) for c in t["compute_capabilities"]]


def keep_earlier_plans(index: dict, out_dir: str, log) -> None:
    """A --graphs rebuild keeps the other graphs' plans in the index when the earlier build matches (dtype,
    TensorRT and its targets, plugin): rebuilding the UNet at new profiles leaves the encoders usable."""
    before = earlier_index(out_dir)
    if before is None:
        return
    same = ("format", "tensorrt", "dtype", "attention", "plugin_library")
    differ = [k for k in same if before.get(k) != index.get(k)]
    if differ:
        left = sorted(set(before.get("graphs") or ()) - set(index["graphs"]))
        if left:
            log(f"engines.json: the earlier plans of {', '.join(left)} are left out (their {', '.join(differ)} "
                "differ from this build's): rebuild them too")
        return
    for name, g in (before.get("graphs") or {}).items():
        if name not in index["graphs"] and os.path.isfile(os.path.join(out_dir, g.get("file", ""))):
            index["graphs"][name] = g
    if index.get("plugin_dir") is None and before.get("plugin_dir"):  # their cubins stay too
        index.update({k: before[k] for k in ("plugin_dir", "archs", "plugin_variants") if k in before})


def write_manifest(manifest: dict, onnx_dir: str, out_dir: str, staging: str) -> None:
    """The export's manifest beside the plans, its weight paths relative to out_dir (the runtime reads it)."""
    if os.path.abspath(out_dir) == os.path.abspath(onnx_dir):
        return
    m = dict(manifest)
    try:
        paths = source_paths(manifest, onnx_dir)
        m["source"] = {**manifest["source"], **source_entry(out_dir, **paths)}
    except EngineError:
        pass  # weights moved or a hub id: keep the entries as they were; the runtime takes --model overrides
    if manifest.get("controlnets"):
        m["controlnets"] = relocated(manifest, onnx_dir, out_dir)
    with open(os.path.join(staging, "manifest.json"), "w") as f:
        json.dump(m, f, indent=1)


def publish(staging: str, out_dir: str, index: dict) -> list[str]:
    """Move the staged plans, plugin/ and manifest into out_dir, then engines.json (the index); -> the plans' paths."""
    with open(os.path.join(staging, "engines.json"), "w") as f:
        json.dump(index, f, indent=1)
    for name in os.listdir(staging):  # plans first, the index last: a reader never sees an index without plans
        if name not in ("engines.json", "plugin"):
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    if os.path.isdir(os.path.join(staging, "plugin")):
        shutil.rmtree(os.path.join(out_dir, "plugin"), ignore_errors=True)
        os.replace(os.path.join(staging, "plugin"), os.path.join(out_dir, "plugin"))
    os.replace(os.path.join(staging, "engines.json"), os.path.join(out_dir, "engines.json"))
    return [os.path.join(out_dir, g["file"]) for g in index["graphs"].values()]
