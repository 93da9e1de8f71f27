"""One `--precision` switch that drives both autocast and the gradient scaler, on any device."""
from __future__ import annotations

import contextlib
import math
from typing import ContextManager, Iterable, Optional, Union

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_MODES = tuple(_DTYPES)


class Precision:
    """Autocast context and GradScaler for one precision mode on one device."""

    def __init__(self, mode: str, device: torch.device, scaler: torch.amp.GradScaler) -> None:
        self.mode = mode
        self.device = device
        self.dtype: torch.dtype = _DTYPES[mode]
        self.scaler = scaler
        self.last_grad_norm: Optional[torch.Tensor] = None  # set by backward_and_step when clipping

    @classmethod
    def create(cls, mode: str, device: Union[str, torch.device]) -> "Precision":
        """Validate `mode` ('fp32' | 'bf16' | 'fp16') for `device` and build the matching setup."""
        if mode not in _DTYPES:
            raise ValueError(f"unknown precision {mode!r}; choose one of {', '.join(PRECISION_MODES)}")
        device = torch.device(device)
        native_bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
        if mode == "bf16" and not native_bf16:
            raise ValueError(
                f"{torch.cuda.get_device_name(device)} has no native bf16 support; "
                "use --precision fp16 (autocast with a gradient scaler) or fp32"
            )
        # Loss scaling only matters for fp16, whose narrow exponent range underflows small gradients.
        scaler = torch.amp.GradScaler(device.type, enabled=mode == "fp16")
        return cls(mode, device, scaler)

    def loss_scale(self) -> float:
        """The gradient scaler's current scale (1.0 unless fp16)."""
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def autocast(self) -> ContextManager[None]:
        """Context for the forward pass: mixed precision for bf16/fp16, nothing for fp32."""
        if self.mode == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward_and_step(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        params_for_clip: Optional[Iterable[torch.nn.Parameter]] = None,
        max_grad_norm: Optional[float] = None,
    ) -> bool:
        """Backward, optional clipping, optimiser step and scaler update; False when the step was skipped.

        The caller zeroes gradients. A step is skipped when gradients are non-finite: by the scaler
        under fp16, and under fp32/bf16 when clipping reveals a non-finite gradient norm.
        """
        self.scaler.scale(loss).backward()
        finite = True
        if max_grad_norm is not None:
            self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            if params_for_clip is None:
                params_for_clip = [p for group in optimizer.param_groups for p in group["params"]]
            if math.isinf(max_grad_norm):  # the norm only: clipping at infinity would rescale every gradient by 1
                grads = [p.grad for p in params_for_clip if p.grad is not None]
                self.last_grad_norm = torch.nn.utils.get_total_norm(grads)
            else:
                self.last_grad_norm = torch.nn.utils.clip_grad_norm_(params_for_clip, max_grad_norm)
            finite = bool(torch.isfinite(self.last_grad_norm))
        if not self.scaler.is_enabled():
            if finite:
                optimizer.step()
            return finite
        scale_before = self.scaler.get_scale()
        if finite:
            self.scaler.step(optimizer)  # skips the step itself when unscaling found inf/NaN
        self.scaler.update()
        # The scale only shrinks when the scaler found non-finite gradients and skipped the step.
        return finite and self.scaler.get_scale() >= scale_before
