"""How a call's UNet rows become each image's noise prediction, each image from its own rows only (so no
request's numbers, finite or not, can reach another's image), and what happens to a request whose latents go
non-finite: it fails alone (engine/guidance.py gives the rows and weights)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ipadapter_instruct.engine.errors import EngineError


@dataclass(frozen=True)
class Combination:
    """Each image's noise prediction from the UNet rows: image i = sum over j of weight[i, j] * rows[index[i, j]],
    where valid[i, j]. index holds image i's own rows only (its request's guidance branches); images with fewer
    rows than k are padded with their first row, which `valid` leaves out (0 x infinity would be NaN)."""
    index: torch.Tensor   # (images, k) long: rows of the UNet batch
    weight: torch.Tensor  # (images, k) float32
    valid: torch.Tensor   # (images, k) bool: False on padding
    padded: bool          # any padding (read once: no host sync per step)

    @classmethod
    def of(cls, latent_of_row: list[int], weights: list[float], images: int) -> "Combination":
        """From each UNet row's image and weight (the plan's rows, in order)."""
        rows: list[list[int]] = [[] for _ in range(images)]
        for j, i in enumerate(latent_of_row):
            rows[i].append(j)
        if any(not r for r in rows):
            raise EngineError("an image has no UNet rows to combine")  # (a plan that lost a request)
        k = max(len(r) for r in rows)
        index = torch.tensor([r + [r[0]] * (k - len(r)) for r in rows], dtype=torch.long)
        weight = torch.tensor([[weights[j] for j in r] + [0.0] * (k - len(r)) for r in rows], dtype=torch.float32)
        valid = torch.tensor([[True] * len(r) + [False] * (k - len(r)) for r in rows])
        return cls(index, weight, valid, any(len(r) < k for r in rows))

    def to(self, device) -> "Combination":
        return Combination(self.index.to(device), self.weight.to(device), self.valid.to(device), self.padded)

    def select(self, images: torch.Tensor, rows: torch.Tensor) -> "Combination":
        """The share of `images` (indices) whose rows are `rows` (sorted indices of the batch): index counts from
        the first of `rows`, as a flight's own UNet batch does (engine/stepping.py)."""
        valid = self.valid.index_select(0, images.to(self.valid.device))
        k = int(valid.sum(1).max())  # its own most rows per image: the padding others needed goes (it is last)
        index = self.index.index_select(0, images.to(self.index.device))[:, :k]
        local = torch.searchsorted(rows.to(index.device), index.contiguous())
        weight = self.weight.index_select(0, images.to(self.weight.device))[:, :k]
        return Combination(local, weight, valid[:, :k], bool((~valid[:, :k]).any()))

    def __call__(self, eps_rows: torch.Tensor) -> torch.Tensor:
        # eps_rows: (rows, C, h, w) -> (images, C * h * w) float32
        terms = eps_rows.flatten(1).float()[self.index] * self.weight.unsqueeze(-1)  # (images, k, C * h * w)
        if self.padded:
            terms = torch.where(self.valid.unsqueeze(-1), terms, 0.0)
        return terms.sum(1)


class NonFinite(EngineError):
    """Some requests' latents went NaN or infinite (their own numbers overflowed): those requests fail, the others'
    outputs stand. requests: the failed ones' indices in the call; outputs: what the call would have returned, with
    None for each failed image (latents: the tensor as it is)."""

    def __init__(self, requests: list[int], outputs=None):
        self.requests, self.outputs = list(requests), outputs
        which = ", ".join(map(str, self.requests))
        super().__init__(f"request {which} of this call: its latents went non-finite (NaN or infinity) while "
                         "denoising: its guidance or adapter scales are too extreme for this model (the other "
                         "requests' outputs are in .outputs)")

    @staticmethod
    def alone() -> EngineError:
        """The error of one failed request on its own (the server's answer to it)."""
        return EngineError("this request's latents went non-finite (NaN or infinity) while denoising: its guidance "
                           "or adapter scales are too extreme for this model; lower them")


def finite_images(latents: torch.Tensor) -> list[bool]:
    """Per image, whether its latents are all finite (one host sync). latents: (images, C, h, w)."""
    return torch.isfinite(latents.flatten(1)).all(1).tolist()


def finite_outputs(latents: torch.Tensor, counts: list[int], output_type: str, decode):
    """A call's result from its final latents (counts: images per request; decode: latents -> images). A request
    whose latents are not finite fails alone: the others' images are decoded as they are (the failed ones' as
    zeros, then dropped) and NonFinite carries them."""
    ok = finite_images(latents)
    firsts = [sum(counts[:r]) for r in range(len(counts))]
    bad = [r for r, (at, n) in enumerate(zip(firsts, counts)) if not all(ok[at:at + n])]
    if output_type == "latent":
        out = latents
    else:
        if bad:
            latents = torch.where(torch.tensor(ok, device=latents.device).view(-1, 1, 1, 1), latents, 0.0)
        out = decode(latents)
    if bad:
        if output_type != "latent":
            keep = [r not in bad for r, n in enumerate(counts) for _ in range(n)]
            out = [im if good else None for im, good in zip(out, keep)]
        raise NonFinite(bad, out)
    return out
