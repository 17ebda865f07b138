"""Per-example gradient clipping for models built only from ``nn.Linear`` layers.

Opacus's default mode (``grad_sample_mode="hooks"``) stores a per-example
gradient of every parameter (batch x out x in for a weight), takes their
norms and then sums the clipped copies. On the small MLPs of the tabular
scenarios this costs several times a non-private step.

For a linear layer ``z = a @ W.T + b`` that receives one input row per example,
example ``i``'s gradient is ``outer(g_i, a_i)`` for ``W`` and ``g_i`` for
``b``, where ``g_i`` is the gradient of example ``i``'s loss with respect
to its output row ``z_i``. Its squared norm is therefore
``|g_i|^2 * (|a_i|^2 + 1)`` (without the ``+ 1`` when there is no bias), the
same formula as Opacus 1.6's norm sampler for ``nn.Linear``
(``opacus/grad_sample/linear.py``, ``compute_linear_norm_sample``). With
the clipping factors ``c_i`` of all layers known, the sum of the clipped
gradients is ``(c * G).T @ A`` for ``W`` and ``sum_i c_i g_i`` for ``b``:
one matrix product per layer. Only one backward pass is needed, with
respect to the layer outputs, so no per-example gradient is ever stored.
Opacus's ghost mode computes the same norms but runs a second backward
pass for the clipped sum.

``ClippedSumDPOptimizer`` then adds Opacus's Gaussian noise to that sum and
steps Opacus's accountant, exactly as for the other modes.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

# Added to the per-example norm before dividing, as in Opacus 1.6's
# DPOptimizer.clip_and_accumulate, so a zero gradient gives factor 1.
NORM_EPSILON = 1e-6


def unsupported_modules(model: torch.nn.Module) -> list[str]:
    """Return the names of the modules that keep trainable parameters but are not ``nn.Linear``.

    An empty list means ``LinearClipper`` can clip ``model``. The root
    module is named ``<root>``.
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            continue
        if any(
            parameter.requires_grad for parameter in module.parameters(recurse=False)
        ):
            names.append(f"{name or '<root>'} ({type(module).__name__})")
    return names


class LinearClipper:
    """Per-example clipping of a model whose trainable parameters all belong to ``nn.Linear`` layers.

    Forward hooks record each layer's input and output while autograd is
    on. ``clipped_backward`` then writes the sum over the batch of the
    per-example gradients, each clipped to ``max_grad_norm`` in L2 over all
    parameters, into every parameter's ``.grad``.

    Parameters
    ----------
    model : torch.nn.Module
        The model to train. Each ``nn.Linear`` must be called exactly once
        per forward pass, on inputs of shape ``(batch, features)``.
    max_grad_norm : float
        The clipping norm.

    Raises
    ------
    ValueError
        If a module other than ``nn.Linear`` has trainable parameters
        (convolutions, normalisation layers, embeddings, loose parameters).
        Opacus's hooks mode handles those.
    """

    def __init__(self, model: torch.nn.Module, max_grad_norm: float) -> None:
        unsupported = unsupported_modules(model)
        if unsupported:
            raise ValueError(
                f"{type(model).__name__} has trainable parameters outside nn.Linear: {', '.join(unsupported)}. "
                "Linear per-example clipping cannot clip them; set privacy.per_example_clipping=opacus."
            )
        self.max_grad_norm = float(max_grad_norm)
        self.layers = [
            module for module in model.modules() if isinstance(module, torch.nn.Linear)
        ]
        self._records: dict[
            torch.nn.Linear, list[tuple[torch.Tensor, torch.Tensor]]
        ] = {layer: [] for layer in self.layers}
        self.hooks = [
            layer.register_forward_hook(self._record) for layer in self.layers
        ]

    def _record(
        self,
        layer: torch.nn.Linear,
        inputs: tuple[torch.Tensor, ...],
        output: torch.Tensor,
    ) -> None:
        if torch.is_grad_enabled():
            self._records[layer].append((inputs[0].detach(), output))

    def reset(self) -> None:
        """Forget the inputs and outputs recorded since the last ``clipped_backward``."""
        for records in self._records.values():
            records.clear()

    def zero_grads(self) -> None:
        """Set every gradient to zero, the clipped sum of an empty batch."""
        for layer in self.layers:
            for parameter in layer.parameters():
                if parameter.requires_grad:
                    parameter.grad = torch.zeros_like(parameter)

    def clipped_backward(self, loss: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Write the sum of the clipped per-example gradients of ``loss`` into each parameter's ``.grad``.

        Parameters
        ----------
        loss : torch.Tensor
            The mean loss over a batch of ``batch_size`` examples, computed by
            one forward pass of the model since the last call. Example ``i``'s
            term may depend only on row ``i`` of each layer's input.
        batch_size : int
            The number of examples (rows) in the batch, at least 1.

        Returns
        -------
        torch.Tensor
            Each example's gradient norm before clipping, shape ``(batch_size,)``.

        Raises
        ------
        ValueError
            If a layer was called more than once in the forward pass or got
            an input that is not ``(batch_size, features)``.
        """
        try:
            inputs, outputs = self._recorded_pass(batch_size)
            # allow_unused: a layer whose output does not reach the loss has zero gradients.
            output_grads = torch.autograd.grad(loss, outputs, allow_unused=True)
        finally:
            self.reset()

        row_grads = [
            torch.zeros_like(output) if grad is None else grad
            for output, grad in zip(outputs, output_grads)
        ]
        # The loss is a mean, so row i of an output gradient is example i's own
        # gradient divided by batch_size. Scaling the (batch,) vectors of norms
        # and factors by batch_size is cheaper than scaling every gradient.
        norms = batch_size * self._row_norms(inputs, row_grads)
        factors = (self.max_grad_norm / (norms + NORM_EPSILON)).clamp(max=1.0)
        self._write_weighted_sum(inputs, row_grads, factors * batch_size)
        return norms

    def _recorded_pass(
        self, batch_size: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        inputs, outputs = [], []
        for layer in self.layers:
            records = self._records[layer]
            if len(records) != 1:
                raise ValueError(
                    f"layer {layer} was called {len(records)} times since the last backward pass; linear per-example "
                    "clipping needs exactly one call per layer and forward pass (no weight sharing, no unused layers), "
                    "so set privacy.per_example_clipping=opacus"
                )
            layer_input, output = records[0]
            if layer_input.dim() != 2 or layer_input.shape[0] != batch_size:
                raise ValueError(
                    f"layer {layer} got an input of shape {tuple(layer_input.shape)}, but linear per-example clipping "
                    f"needs shape ({batch_size}, features); set privacy.per_example_clipping=opacus for sequence inputs"
                )
            inputs.append(layer_input)
            outputs.append(output)
        return inputs, outputs

    def _row_norms(
        self, inputs: list[torch.Tensor], row_grads: list[torch.Tensor]
    ) -> torch.Tensor:
        """Return the L2 norm over all parameters of each row's gradient, shape ``(batch,)``."""
        squared = torch.zeros(inputs[0].shape[0], dtype=inputs[0].dtype)
        for layer, layer_input, grad in zip(self.layers, inputs, row_grads):
            grad_squared = torch.linalg.vecdot(grad, grad)
            if layer.weight.requires_grad:
                input_squared = torch.linalg.vecdot(layer_input, layer_input)
                squared.addcmul_(grad_squared, input_squared)
            if layer.bias is not None and layer.bias.requires_grad:
                squared += grad_squared
        return squared.sqrt()

    def _write_weighted_sum(
        self,
        inputs: list[torch.Tensor],
        row_grads: list[torch.Tensor],
        weights: torch.Tensor,
    ) -> None:
        """Set each parameter's ``.grad`` to the sum over rows of ``weights[i]`` times row i's gradient."""
        for layer, layer_input, grad in zip(self.layers, inputs, row_grads):
            if layer.weight.requires_grad:
                layer.weight.grad = (grad * weights.unsqueeze(1)).T @ layer_input
            if layer.bias is not None and layer.bias.requires_grad:
                layer.bias.grad = weights @ grad


class ClippedSumDPOptimizer(DPOptimizerFastGradientClipping):
    """Opacus's DP optimizer for gradients that are already the clipped sum over the batch.

    ``LinearClipper.clipped_backward`` writes that sum into ``.grad``. Each
    step then adds Gaussian noise with standard deviation
    ``noise_multiplier * max_grad_norm``, divides by the expected batch size
    and calls the accountant's step hook, as every Opacus optimizer does.
    ``zero_grad``, ``accumulate`` and ``add_noise`` differ from the parent
    class (Opacus 1.6) only in memory use and overhead. They work in place
    on the tensors the clipper writes every step. Opacus makes a deep copy,
    a zero tensor and a new sum per parameter. The noise draws are the same.
    """

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Set ``.grad`` and the summed gradient of every parameter to None.

        ``LinearClipper`` assigns new ``.grad`` tensors every step, so there
        is nothing to zero in place and ``set_to_none`` is ignored. This skips
        the wrapped optimizer's own ``zero_grad``, a few percent of a step on
        the fraud MLP.
        """
        for parameter in self.params:
            if not self._is_last_step_skipped:
                parameter.summed_grad = None
            parameter.grad = None

    def accumulate(self) -> None:
        """Take each parameter's ``.grad`` as its summed gradient.

        Raises
        ------
        RuntimeError
            If a summed gradient is left from an earlier batch. Poisson
            sampling draws one batch per step, so gradients are never
            accumulated over several batches.
        """
        for parameter in self.params:
            if parameter.summed_grad is not None:
                raise RuntimeError(
                    "a summed gradient is left from an earlier batch; call zero_grad() before every batch"
                )
            if parameter.grad is None:
                raise RuntimeError(
                    "a parameter has no gradient; call LinearClipper.clipped_backward or zero_grads first"
                )
            parameter.summed_grad = parameter.grad

    def add_noise(self) -> None:
        """Add Gaussian noise with standard deviation ``noise_multiplier * max_grad_norm`` to each summed gradient.

        The draws are Opacus 1.6's (``optimizer._generate_noise`` outside
        secure mode): one ``torch.normal`` call per parameter, in parameter
        order, from the optimizer's generator, and none when the standard
        deviation is 0. Secure mode and adaptive clipping use Opacus's own
        method.
        """
        if self.secure_mode or hasattr(self, "_adjusted_noise_multiplier"):
            super().add_noise()
            return

        std = self.noise_multiplier * self.max_grad_norm
        for parameter in self.params:
            summed = parameter.summed_grad
            _check_processed_flag(summed)
            if std > 0:
                noise = torch.normal(
                    mean=0,
                    std=std,
                    size=summed.shape,
                    device=summed.device,
                    generator=self.generator,
                    dtype=summed.dtype,
                )
                summed.add_(noise)
            parameter.grad = summed.view_as(parameter)
            _mark_as_processed(summed)
