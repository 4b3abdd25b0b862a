"""Request images cost what they are used at, and the pixels decoded at once are bounded across requests: each image
decodes no larger than its use (a JPEG at libjpeg's draft scale, a PNG reduced right after its decode, as its consumer
would reduce it, so the consumer's own preprocessing gives the same tensor), and concurrent uploads wait for room
under --max-decode-pixels instead of all decoding at once."""
import asyncio
import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from ipadapter_instruct.engine.server.config import ServerConfig
from ipadapter_instruct.engine.server.images import Use, decode, open_image
from ipadapter_instruct.engine.server.uploads import PixelBudget

from conftest import NEGATIVE, PROMPT, load_pipe
from server_utils import InProcessServer, decode_png, png_base64

STYLE = "use the style of this image"


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo():
    """A smooth 640x480 picture with some detail (JPEG and Lanczos both have something to do)."""
    y, x = np.mgrid[0:480, 0:640]
    rgb = np.stack([x * 255 / 640, y * 255 / 480, 128 + 100 * np.sin(x / 17.0) * np.cos(y / 23.0)], -1)
    return Image.fromarray(rgb.astype("uint8"))


@pytest.fixture(scope="module")
def processor(tiny):
    from ipadapter_instruct.engine.loading import _image_processor_class
    return _image_processor_class().from_pretrained(tiny["image_encoder"])


def test_use_targets():
    assert Use(short=32).target(640, 480) == (42, 32) and Use(short=32).target(480, 640) == (32, 42)
    assert Use(short=32).target(40, 30) is None                       # used at its size or larger: as it is
    assert Use(width=64, height=48).target(640, 480) == (64, 48)
    assert Use(width=64, height=48).target(60, 40) is None
    assert Use(grid=8).target(54, 70) == (48, 64) and Use(grid=8).target(48, 64) is None
    with pytest.raises(Exception, match="over the largest output 256 px"):
        Use(grid=8, max_side=256).target(640, 480)


def test_a_png_decodes_reduced_to_what_each_consumer_makes_of_it(photo, processor):
    from diffusers.image_processor import IPAdapterMaskProcessor, VaeImageProcessor

    data = encoded(photo, "PNG")
    short = processor.size["shortest_edge"]
    clip = decode(data, 10**7, 10**7, Use(short=short, resample=int(processor.resample)))
    assert min(clip.size) == short
    assert torch.equal(processor(images=[clip], return_tensors="pt").pixel_values,
                       processor(images=[photo], return_tensors="pt").pixel_values)
    vae = VaeImageProcessor(vae_scale_factor=8)
    small = decode(data, 10**7, 10**7, Use(width=64, height=48))
    assert small.size == (64, 48)
    assert torch.equal(vae.preprocess(small, height=48, width=64), vae.preprocess(photo, height=48, width=64))
    masks = IPAdapterMaskProcessor(vae_scale_factor=8)
    assert torch.equal(masks.preprocess(small, height=48, width=64), masks.preprocess(photo, height=48, width=64))


def test_a_jpeg_decodes_at_draft_scale(photo):
    data = encoded(photo.resize((1024, 768)), "JPEG", quality=95)
    pending = open_image(data, 10**7, 10**7, Use(short=32))
    assert pending.pixels == 128 * 96       # libjpeg's 1/8 scale: never the 1024x768 pixels
    full = decode(data, 10**7, 10**7)
    reduced = decode(data, 10**7, 10**7, Use(short=32))
    assert reduced.size == (42, 32) and full.size == (1024, 768)
    want = np.asarray(full.resize((42, 32), Image.Resampling.LANCZOS), int)
    assert np.abs(np.asarray(reduced, int) - want).mean() < 3   # the same picture, from the DCT's reduced scale


def test_the_budget_is_first_come_first_served_and_bounded():
    async def go():
        budget, order = PixelBudget(10), []

        async def take(name, n, hold):
            await budget.acquire(n, 5.0)
            order.append(name)
            await asyncio.sleep(hold)
            budget.release(n)
        first = asyncio.ensure_future(take("a", 6, 0.05))
        await asyncio.sleep(0)
        waiting = [asyncio.ensure_future(take(n, p, 0.01)) for n, p in (("big", 8), ("small", 2))]
        await asyncio.gather(first, *waiting)
        assert order == ["a", "big", "small"] and budget.peak <= 10 and budget.held == 0  # small waited behind big
        await budget.acquire(30, 1.0)           # larger than the whole budget: alone
        with pytest.raises(TimeoutError):
            await budget.acquire(1, 0.05)
        budget.release(30)
        assert budget.held == 0 and not budget._waiters
    asyncio.run(go())


def test_an_image_waiting_for_room_past_its_deadline_is_504(photo):
    from ipadapter_instruct.engine.server.errors import ApiError
    from ipadapter_instruct.engine.server.uploads import decode_all

    async def go():
        budget = PixelBudget(640 * 480)
        await budget.acquire(1, 1.0)     # another request is decoding: this image does not fit beside it
        with pytest.raises(ApiError) as e:
            await decode_all({"image": encoded(photo, "PNG")}, {}, budget, 10**7, 10**7, time.monotonic() + 0.05)
        assert e.value.status == 504 and e.value.field == "image" and "before compute" in e.value.message
        assert budget.held == 1 and not budget._waiters
    asyncio.run(go())


class InFlight:
    """PIL's ImageFile.load wrapped: the pixels being decoded at once, whatever code calls it."""

    def __init__(self, monkeypatch):
        self.now = self.peak = 0
        self.lock = threading.Lock()
        real = ImageFile.ImageFile.load

        def load(im):
            if not im.tile:  # decoded already
                return real(im)
            n = im.size[0] * im.size[1]
            with self.lock:
                self.now += n
                self.peak = max(self.peak, self.now)
            try:
                time.sleep(0.05)  # long enough that concurrent uploads overlap
                return real(im)
            finally:
                with self.lock:
                    self.now -= n
        monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_concurrent_uploads_decode_within_the_budget(tiny, monkeypatch):
    side = 256
    server = InProcessServer(ServerConfig(max_pixels=side * side, max_decode_pixels=2 * side * side, max_wait_ms=50,
                                          warmup=False), load_pipe(tiny, tiny["adapter"]))
    try:
        flight = InFlight(monkeypatch)
        images = [Image.new("RGB", (side, side), (i * 20, 90, 200 - i * 20)) for i in range(8)]
        bodies = [{"prompt": PROMPT, "negative_prompt": NEGATIVE, "instruct": STYLE, "image": png_base64(im),
                   "num_inference_steps": 1, "seed": i} for i, im in enumerate(images)]
        answers = server.concurrently(*[("POST", "/v1/generate", {"json": b}) for b in bodies])
        assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
        assert flight.peak <= 2 * side * side, flight.peak             # never all eight at once
        assert server.state.decode_budget.peak <= 2 * side * side and server.state.decode_budget.held == 0
        assert "engine_decode_pixels 0.0" in server.request("GET", "/metrics").text
        monkeypatch.undo()
        pipe = server.state.pipe      # what the reduced image gives is what the full-size one gives
        want = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, instruct=STYLE, image=images[3], num_inference_steps=1,
                    seed=3)[0]
        got = decode_png(answers[3].json()["images"][0])
        assert np.abs(np.asarray(got, int) - np.asarray(want, int)).max() <= 1
    finally:
        server.close()
