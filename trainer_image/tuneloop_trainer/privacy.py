"""Differential privacy (``spec.privacy``): DP-SGD with Opacus.

What the guarantee needs, and how this module provides it:

* **Per-sample gradients, clipped.** Opacus' hooks (``PrivacyEngine.make_private_with_epsilon``
  with ``wrap_model=False``: the model stays the recipe's own object) compute each example's
  gradient; its :class:`~opacus.optimizers.DPOptimizer` clips each to ``maxGradNorm``, sums them,
  adds Gaussian noise of standard deviation ``noise_multiplier × maxGradNorm`` and divides by the
  expected batch size. Every example's loss must depend on that example alone, so the recipe
  divides the summed loss by the batch's row count (:meth:`DifferentialPrivacy.loss_divisor`),
  never by its token count, which depends on the other rows.
* **Poisson sampling.** The accountant's bound assumes that every step includes each training
  row independently with probability ``q``. The recipe's own batching (length-grouped or packed
  batches that cover the epoch exactly once) does not: :meth:`DifferentialPrivacy.batches`
  replaces it with Opacus' ``UniformWithReplacementSampler``: ``1/q = ceil(rows / batchSize)``
  independent draws per epoch, batches of varying size (possibly empty: the step then applies
  noise alone). Sampling and noise come from a generator seeded with operating-system
  randomness, not from ``hyperparameters.seed``: noise that anyone can recompute from the spec
  protects nothing. DP runs are therefore not bit-for-bit reproducible.
* **Accounting.** The noise multiplier is calibrated (RDP accountant) so that the planned steps
  spend at most ``targetEpsilon`` at ``delta``; the ε reported is the RDP accountant's for the
  steps actually taken (early stopping spends less), recomputed from the step count so that a
  resumed run accounts for the steps before its restart.

The guarantee covers the trained weights. The training loss curve, the data profile and the
validation report describe the training data directly and are not covered: restrict who reads
them as you would the data.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tuneloop_trainer.errors import InvalidConfigError

log = logging.getLogger(__name__)

#: Accountant used both to calibrate the noise and to report ε (Rényi DP, Mironov 2017).
ACCOUNTANT = "rdp"
#: Rows in the probe batch that checks, before training, that every trained parameter gets a
#: gradient per example.
PROBE_ROWS = 2


@dataclass(frozen=True)
class PrivacySpent:
    """The privacy a run spent: what the model card, the metrics and the console report."""

    epsilon: float
    delta: float
    target_epsilon: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    expected_batch_size: int
    train_rows: int
    accountant: str = ACCOUNTANT
    setup_seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        """Added to the run's final metrics (``status.runs[].metrics``)."""
        return {"privacy_epsilon": self.epsilon, "privacy_delta": self.delta}

    def to_dict(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "targetEpsilon": self.target_epsilon,
            "noiseMultiplier": self.noise_multiplier,
            "sampleRate": self.sample_rate,
            "steps": self.steps,
            "maxGradNorm": self.max_grad_norm,
            "expectedBatchSize": self.expected_batch_size,
            "trainRows": self.train_rows,
            "accountant": self.accountant,
            "setupSeconds": round(self.setup_seconds, 3),
        }

    def summary_line(self) -> str:
        return (
            f"differential privacy: ε = {self.epsilon:.3f} spent (target {self.target_epsilon:g}, "
            f"δ = {self.delta:.3g}) over {self.steps} DP-SGD steps; noise multiplier "
            f"{self.noise_multiplier:.4f}, sample rate {self.sample_rate:.4g} (Poisson, expected batch "
            f"{self.expected_batch_size} of {self.train_rows:,} rows), per-example clipping norm "
            f"{self.max_grad_norm:g}, {self.accountant.upper()} accountant"
        )


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε spent by ``steps`` Poisson-subsampled Gaussian steps (Opacus' RDP accountant)."""
    from opacus.accountants import RDPAccountant  # noqa: PLC0415

    if steps <= 0:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": a looser bound, still valid
        return float(accountant.get_epsilon(delta=delta))


class DifferentialPrivacy:
    """DP-SGD for one run. The recipe calls, in order: :meth:`batches` (in place of its own
    batching), :meth:`attach` (before ``accelerator.prepare``), :meth:`check_per_sample_gradients`,
    then per step :meth:`loss_divisor` and :meth:`before_step`, and :meth:`spent` at the end."""

    def __init__(
        self,
        settings: Any,
        *,
        train_rows: int,
        batch_size: int,
        mixed_precision: str,
    ) -> None:
        """``settings``: ``spec.privacy``. Raises :class:`InvalidConfigError` for what only the
        data or the machine can tell (the spec's rules are checked by ``tuneloop validate``)."""
        if mixed_precision == "fp16":
            raise InvalidConfigError(
                "spec.privacy cannot be guaranteed with fp16 mixed precision: loss scaling multiplies the "
                "per-example gradients before they are clipped and skips overflowing steps that the accountant "
                "would still count; set hyperparameters.precision: bf16 or fp32"
            )
        self.target_epsilon = float(settings.target_epsilon)
        self.max_grad_norm = float(settings.max_grad_norm)
        self.train_rows = train_rows
        self.delta = float(settings.delta) if settings.delta is not None else _default_delta(train_rows)
        if self.delta >= 1.0 / train_rows:
            raise InvalidConfigError(
                f"spec.privacy.delta {self.delta:g} is not below 1/{train_rows:,} (one over the training rows): "
                "a mechanism may then publish a whole training example with probability delta; use a delta "
                f"below {1.0 / train_rows:.3g} or omit it (default 1/(10 × rows))"
            )
        # Opacus' convention (DPDataLoader): q = 1 / number of batches of batchSize in an epoch.
        self.steps_per_epoch = max(1, math.ceil(train_rows / batch_size))
        self.sample_rate = 1.0 / self.steps_per_epoch
        self.expected_batch_size = max(1, round(train_rows * self.sample_rate))
        self._sampling = torch.Generator().manual_seed(secrets.randbits(63))
        self._noise: torch.Generator | None = None
        self.optimizer: Any = None
        self.noise_multiplier: float | None = None
        self.setup_seconds = 0.0
        self._shared_inputs: list[Any] = []
        self._model: nn.Module | None = None
        self._rows = 0

    # --- sampling ---------------------------------------------------------------------

    def batches(self) -> list[list[int]]:
        """One epoch of Poisson-sampled batches (row indices; some may be empty). Drawn afresh on
        every call: each step's draw is independent of every other, which is what the accountant
        assumes, so a resumed epoch may draw new batches."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler  # noqa: PLC0415

        sampler = UniformWithReplacementSampler(
            num_samples=self.train_rows,
            sample_rate=self.sample_rate,
            generator=self._sampling,
            steps=self.steps_per_epoch,
        )
        return [list(map(int, b)) for b in sampler]

    # --- the model and the optimizer --------------------------------------------------

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
        """Validate the model for Opacus, hook per-sample gradients into it (in place), calibrate
        the noise for ``total_steps`` and return the DP optimizer wrapping ``optimizer``."""
        from opacus import PrivacyEngine  # noqa: PLC0415
        from opacus.validators import ModuleValidator  # noqa: PLC0415

        t0 = time.monotonic()
        self._model = model
        model.train()
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise InvalidConfigError(
                "spec.privacy: Opacus cannot train this model with per-example gradients: "
                + "; ".join(str(e) for e in errors[:5])
                + " (layers such as BatchNorm mix examples within a batch)"
            )
        self._noise = torch.Generator().manual_seed(secrets.randbits(63))
        index = torch.utils.data.TensorDataset(torch.arange(self.train_rows))
        loader = torch.utils.data.DataLoader(index, batch_size=math.ceil(self.train_rows / self.steps_per_epoch))
        # Opacus calibrates for int(epochs / sample_rate) steps: half a step more than planned keeps
        # the float division from rounding the plan down (which would spend more than the target).
        epochs = (total_steps + 0.5) * self.sample_rate
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "secure RNG turned off": the generators are seeded from os.urandom
            engine = PrivacyEngine(accountant=ACCOUNTANT)
            self.hooks, self.optimizer, _ = engine.make_private_with_epsilon(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                target_epsilon=self.target_epsilon,
                target_delta=self.delta,
                epochs=epochs,  # type: ignore[arg-type]  # a float is what int(epochs / sample_rate) needs here
                max_grad_norm=self.max_grad_norm,
                loss_reduction="mean",
                poisson_sampling=True,
                noise_generator=self._noise,
                wrap_model=False,
            )
        self.noise_multiplier = float(self.optimizer.noise_multiplier)
        self._hook_shared_inputs(model)
        self.setup_seconds = time.monotonic() - t0
        return self.optimizer

    def _hook_shared_inputs(self, model: nn.Module) -> None:
        """Trained embeddings that the model feeds one index row for the whole batch (absolute
        position embeddings: ``position_ids`` of shape ``(1, length)``) get it repeated once per
        example during DP training, so that their gradient is computed per example; the values,
        and so the model's output, are unchanged."""

        def expand(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            rows = self._rows
            if not (module.training and torch.is_grad_enabled()) or rows <= 1 or not args:
                return None
            ids = args[0]
            if isinstance(ids, torch.Tensor) and ids.dim() >= 2 and ids.shape[0] == 1:
                return (ids.expand(rows, *ids.shape[1:]), *args[1:])
            return None

        for module in model.modules():
            if isinstance(module, nn.Embedding) and module.weight.requires_grad:
                self._shared_inputs.append(module.register_forward_pre_hook(expand))

    def check_per_sample_gradients(self, loss_sum: Callable[[list[int]], torch.Tensor]) -> None:
        """Run one forward/backward on :data:`PROBE_ROWS` training rows (nothing is updated or
        released) and refuse the run when a trained parameter gets no per-example gradient.
        ``loss_sum(rows)`` returns the summed loss of those rows."""
        rows = list(range(min(PROBE_ROWS, self.train_rows)))
        self.start_batch(len(rows))
        loss = loss_sum(rows)
        (loss / len(rows)).backward()
        missing = []
        for name, p in self._named_params():
            sample = getattr(p, "grad_sample", None)
            if sample is None or sample.shape[0] != len(rows):
                missing.append(name)
        self.optimizer.zero_grad(set_to_none=True)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise InvalidConfigError(
                f"spec.privacy: Opacus cannot compute a per-example gradient for {shown} (the layer is shared "
                "across the batch in a way its hooks do not see); use method.type: lora, which trains other weights"
            )

    def _named_params(self) -> list[tuple[str, torch.Tensor]]:
        assert self._model is not None, "attach() first"
        names = {id(p): n for n, p in self._model.named_parameters()}
        return [(names.get(id(p), f"parameter {i}"), p) for i, p in enumerate(self.optimizer.params)]

    # --- each step ------------------------------------------------------------------------

    def start_batch(self, rows: int) -> None:
        """Say how many examples the next forward pass holds."""
        self._rows = rows

    def loss_divisor(self, rows: int) -> int:
        """What the summed loss is divided by before ``backward``: the row count, so each
        example's gradient is that of its own (summed) loss; Opacus' ``mean`` reduction undoes it."""
        return max(1, rows)

    def before_step(self, *, empty: bool) -> None:
        """Before ``optimizer.step()``. An empty Poisson draw still takes its step (noise only):
        the accountant counts it, and skipping it would make the step count depend on the data."""
        if empty:
            for p in self.optimizer.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)

    # --- the account ----------------------------------------------------------------------

    def spent(self, steps: int) -> PrivacySpent:
        """The privacy spent by ``steps`` DP-SGD steps of this run."""
        assert self.noise_multiplier is not None, "attach() first"
        return PrivacySpent(
            epsilon=epsilon_for(self.noise_multiplier, self.sample_rate, steps, self.delta),
            delta=self.delta,
            target_epsilon=self.target_epsilon,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=steps,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            train_rows=self.train_rows,
            setup_seconds=self.setup_seconds,
        )

    def detach(self) -> None:
        """Remove the hooks (before the final evaluations and saving)."""
        for handle in self._shared_inputs:
            handle.remove()
        self._shared_inputs.clear()
        cleanup = getattr(self.hooks, "cleanup", None)
        if cleanup is not None:
            cleanup()


def _default_delta(train_rows: int) -> float:
    """1/(10·rows), rounded down to one significant digit (e.g. 2,000 rows → 5e-05)."""
    raw = 1.0 / (10 * max(1, train_rows))
    exponent = math.floor(math.log10(raw))
    return math.floor(raw / 10**exponent) * 10**exponent
