"""Starting from a photo on /v1/generate (`init_image`, `strength`, `mask_image`): the size each is decoded at, the
checks the engine makes (engine/img2img.py `parse_start`, its refusal answered as a 422 naming the field), and the
step a request starts at, which the batch key holds (requests of different start steps never share a call)."""
from __future__ import annotations

from ipadapter_instruct.engine.errors import EngineError
from ipadapter_instruct.engine.img2img import first_step, parse_start
from ipadapter_instruct.engine.loading import MAX_SIZE_FACTOR
from ipadapter_instruct.engine.server.errors import FieldError
from ipadapter_instruct.engine.server.images import Use

FIELDS = ("init_image", "mask_image", "strength")  # the request's fields, as the engine's messages begin


def uses(runner, req) -> dict:
    """img2img without height/width: the photo at its own size on the VAE grid (the output's, as the pipeline takes
    it); else (inpainting, or a size given) at the output size. The mask as its photo, so both stay one size."""
    img2img = req.init_image is not None and req.mask_image is None
    if img2img and req.height is None and req.width is None:
        use = Use(grid=runner.factor, max_side=runner.max_size or runner.native * MAX_SIZE_FACTOR)
    else:
        use = runner._output_use(req.height, req.width)
    return {"init_image": use, "mask_image": use}


def check(runner, req, photo, mask):
    """The engine's checks of a request's photo, mask and strength (and of an inpainting model without them), and
    the step it starts at. FieldError naming the field -> (the Start or None, its first step)."""
    if photo is not None and mask is not None:  # the sizes sent: both may have been reduced on decoding
        sent = {name: im.info.get("sent_size", im.size) for name, im in (("init_image", photo), ("mask_image", mask))}
        if sent["mask_image"] != sent["init_image"]:
            (mw, mh), (pw, ph) = sent["mask_image"], sent["init_image"]
            raise FieldError("mask_image", f"mask_image is {mw}x{mh} but init_image is {pw}x{ph}: the mask must be "
                                           "the photo's size")
    try:
        start = parse_start(runner.pipe, photo, mask, req.strength, "", {})
    except EngineError as e:
        message = str(e)
        field = next((f for f in FIELDS if message.startswith(f)), "mask_image" if photo is not None else "init_image")
        raise FieldError(field, message) from None
    if start is None:
        return None, 0
    try:
        return start, first_step(start.strength, req.num_inference_steps)
    except EngineError as e:
        raise FieldError("strength", str(e)) from None
