"""LoRA on the engine's pipelines, through diffusers' own loaders and peft (no converter of ours).

    pipe.load_lora_weights("style.safetensors", scale=0.8)          # fused into the weights: free per step
    pipe.load_lora_weights("lcm-lora.safetensors", adapter_name="lcm", fuse=False)   # kept switchable
    pipe.set_lora_scales({"style": 0.5, "lcm": 1.0})
    pipe.unload_lora_weights()                                       # the base weights back, bit for bit

`Pipeline` takes diffusers' `StableDiffusionLoraLoaderMixin`, so every format diffusers reads for SD1.5 loads
(diffusers/peft, kohya and A1111 `.safetensors`: `lora_state_dict` converts them), into the UNet and the text
encoder; `SDXLPipeline` takes its `StableDiffusionXLLoraLoaderMixin` the same way, the second text encoder too. The
engine's processors and fused kernels call the wrapped Linear modules, so a LoRA applies on every path. Fusing (the
default) merges every loaded LoRA at its scale into the weights, so it costs nothing per step; the weights before
the first merge are kept, and unfusing or unloading copies them back, so the base returns exactly (peft's unmerge
subtracts, which is off by rounding). CUDA graphs captured before a weight change are dropped, so they are captured
again once, on the next call at each shape, never per request.
"""
from __future__ import annotations

import os

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin

from ipadapter_instruct.engine.encoding import constants
from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.safe_load import refusal
from ipadapter_instruct.engine.unet_step import graphs_changed


class LoraMixin(StableDiffusionLoraLoaderMixin):
    hf_device_map = None  # (diffusers' loaders ask: no accelerate device map here)
    _loader = StableDiffusionLoraLoaderMixin  # diffusers' loader of this model family (SDXL: its XL loader)

    @property
    def components(self) -> dict:
        return {**{n: getattr(self, n) for n in self._lora_loadable_modules}, "vae": self.vae}

    @property
    def loras(self) -> dict[str, float]:
        """The loaded LoRAs and their scales."""
        return dict(self.__dict__.setdefault("_loras", {}))

    def load_lora_weights(self, path, adapter_name: str | None = None, scale: float = 1.0, fuse: bool = True,
                          **kwargs) -> str:
        """Load a LoRA file (or a diffusers LoRA folder) into the UNet and text encoder at `scale`; -> its
        adapter name. fuse: merge every loaded LoRA into the weights (default); False keeps them switchable (a
        little work per step). kwargs go to diffusers' loader (weight_name=, ...)."""
        loras = self.__dict__.setdefault("_loras", {})
        name = adapter_name or f"lora_{len(loras)}"
        if name in loras:
            raise EngineError(f"a LoRA named {name!r} is loaded already; unload it or pick another adapter_name")
        if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
            raise EngineError(f"LoRA file not found: {os.fspath(path)}")
        was_fused = self._lora_fused()
        self._unfuse_exactly()  # loading into merged layers would mix the new LoRA into the saved base
        try:
            self._loader.load_lora_weights(self, path, adapter_name=name, **kwargs)
        except (ValueError, KeyError, RuntimeError, OSError, TypeError) as e:
            lines = [line.strip() for line in str(e).strip().splitlines()] or [type(e).__name__]
            mismatch = next((line for line in lines if "size mismatch" in line), None)
            first = refusal(e) or (f"{lines[0]} {mismatch} (a LoRA for another base model?)" if mismatch
                                   else lines[0])[:400]
            self._forget(name)
            if was_fused and loras:
                self._fuse(loras)
            shown = "(a state dict)" if isinstance(path, dict) else os.fspath(path)
            raise EngineError(f"cannot load the LoRA {shown}: {first}") from None
        loras[name] = float(scale)
        self.set_lora_scales({}, fuse=fuse)
        return name

    def set_lora_scales(self, scales: dict[str, float], fuse: bool | None = None) -> None:
        """New scales for loaded LoRAs ({name: scale}); fuse: merge all (default: as they are now)."""
        loras = self.__dict__.setdefault("_loras", {})
        unknown = sorted(set(scales) - set(loras))
        if unknown:
            raise EngineError(f"no LoRA named {', '.join(unknown)} is loaded; loaded: {', '.join(loras) or 'none'}")
        fuse = self._lora_fused() if fuse is None else fuse
        loras.update({k: float(v) for k, v in scales.items()})
        self._unfuse_exactly()
        if loras:
            self.set_adapters(list(loras), list(loras.values()))
            if fuse:
                self._fuse(loras)
        self._weights_changed()

    def unload_lora_weights(self, *args, **kwargs) -> None:
        """Remove every LoRA; the base weights return exactly."""
        self._unfuse_exactly()
        self._loader.unload_lora_weights(self, *args, **kwargs)
        self.__dict__["_loras"] = {}
        self._weights_changed()

    def _forget(self, name: str) -> None:
        # a load that failed half-way may have left an adapter of that name in a model
        for model in self._lora_models():
            if name in getattr(model, "peft_config", {}):
                try:
                    model.delete_adapters(name) if hasattr(model, "delete_adapters") else None
                except Exception:  # best effort: the error being raised says what went wrong
                    pass

    # ---- exact fusing ---------------------------------------------------------------------------------------

    def _lora_models(self) -> list:
        return [getattr(self, n) for n in self._lora_loadable_modules]

    def _lora_layers(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for model in self._lora_models():
            for name, m in model.named_modules():
                if isinstance(m, BaseTunerLayer):
                    yield m

    def _lora_fused(self) -> bool:
        return bool(self.__dict__.get("_lora_snapshot"))

    def _fuse(self, loras: dict) -> None:
        layers = list(self._lora_layers())
        self.__dict__["_lora_snapshot"] = [(p, p.detach().clone()) for m in layers
                                           for p in m.get_base_layer().parameters(recurse=False)]
        self.fuse_lora(components=list(self._lora_loadable_modules), lora_scale=1.0, adapter_names=list(loras))

    def _unfuse_exactly(self) -> None:
        snapshot = self.__dict__.pop("_lora_snapshot", None)
        if not snapshot:
            return
        self.unfuse_lora(components=list(self._lora_loadable_modules))
        with torch.no_grad():
            for param, saved in snapshot:  # peft's unmerge subtracts: put the bits back
                param.copy_(saved)

    def _weights_changed(self) -> None:
        graphs_changed(self)  # graphs captured or compiled before hold the old weights
        constants(self).forget("text")  # the fixed instructions were encoded with the old text encoder
