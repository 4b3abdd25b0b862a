"""Optimisation profiles for `python -m export trt`: the min/opt/max shape of every graph input, from the export's
manifest with the user's --min/--opt/--max (trtexec's NAME:DxDx... syntax) over it, checked against the graphs'
fixed dimensions and the export's axis ranges before TensorRT loads."""
from ipadapter_instruct.engine.errors import EngineError

BOUNDS = ("min", "opt", "max")


def dims_text(shape) -> str:
    return "x".join(str(d) for d in shape)


def parse_shapes(values, flag: str) -> dict[str, tuple[int, ...]]:
    """trtexec's shape syntax, from repeated and/or comma-separated flags: ["sample:2x4x64x64,timestep:2"]."""
    out = {}
    for value in values or ():
        for piece in (p.strip() for p in value.split(",")):
            if not piece:
                continue
            name, sep, dims = piece.rpartition(":")
            try:
                shape = tuple(int(d) for d in dims.split("x"))
            except ValueError:
                shape = ()
            if not sep or not name or not shape or min(shape) < 1:
                raise EngineError(f"bad {flag} shape {piece!r}: expected NAME:DxDx... with positive integers, "
                                  f"e.g. sample:2x4x64x64")
            if name in out:
                raise EngineError(f"{flag} gives {name} twice")
            out[name] = shape
    return out


def graph_profiles(manifest: dict, shapes: dict | None = None) -> dict:
    """{graph: {input: (min, opt, max)}}: the manifest's profiles with the user's shapes ({"min": {name: dims}})
    over them; every input checked for rank, fixed dimensions and min <= opt <= max."""
    shapes = shapes or {}
    out, names = {}, set()
    for gname, g in manifest["graphs"].items():
        out[gname] = {}
        for inp in g["inputs"]:
            name, axes = inp["name"], inp["shape"]
            names.add(name)
            bounds = []
            for b in BOUNDS:
                dims = shapes.get(b, {}).get(name) or g["profiles"].get(b, {}).get(name)
                if dims is None and all(isinstance(a, int) for a in axes):
                    dims = axes
                if dims is None:
                    raise EngineError(f"{gname}: no {b} shape for input {name}; give --{b} {name}:DxD...")
                dims = tuple(int(d) for d in dims)
                if len(dims) != len(axes) or any(isinstance(a, int) and a != d for a, d in zip(axes, dims)):
                    raise EngineError(f"{gname}: {b} shape {dims_text(dims)} for input {name} does not fit its shape "
                                      f"({'x'.join(str(a) for a in axes)})")
                for a, d in zip(axes, dims):  # a named axis stays in the range the export was made and checked for
                    lo, hi = (g.get("axes", {}).get(a, {}).get(k) for k in ("min", "max")) if isinstance(a, str) \
                        else (None, None)
                    if lo is not None and not lo <= d <= hi:
                        raise EngineError(f"{gname}: {b} shape {dims_text(dims)} for input {name} puts {a} at {d}, "
                                          f"outside the export's range {lo}-{hi} (manifest.json axes)")
                bounds.append(dims)
            if not all(lo <= opt <= hi for lo, opt, hi in zip(*bounds)):
                raise EngineError(f"{gname}: input {name} needs min <= opt <= max in every dimension, got "
                                  f"{' / '.join(dims_text(s) for s in bounds)}")
            out[gname][name] = tuple(bounds)
    unknown = sorted({n for b in BOUNDS for n in shapes.get(b, {})} - names)
    if unknown:
        raise EngineError(f"no graph has an input named {', '.join(unknown)}; "
                          f"the inputs are {', '.join(sorted(names))}")
    return out
