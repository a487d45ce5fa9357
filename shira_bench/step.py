"""One decode step of a batch (`shira bench step`), in process, with and without rows of other adapter sets.

Variants, each with its own prefilled batch, visited in turn for `--steps` steps per round so that drift in the
machine's speed hits each alike:
  base        the base weights
  single      one adapter applied (the Switcher's scatter), every row on it
  mixed       rows drawn from a Zipf distribution over the adapters; the base is merged and every adapted row
              is corrected by its own delta (batched row corrections)
  mixed-host  the same rows with the most common set merged into the weights; its rows run free, the others
              carry their own delta and the merged set's, negated (the name and the JSON's "host" key predate
              the code's word "merged set" and are kept for comparisons with earlier figures)
The two mixed variants run on the native kernel (shira_core.batched.kernel) where it builds, and again as
`mixed-torch` and `mixed-host-torch` on PyTorch's sparse products, side by side.
This is the serving benchmark's mixed/single ratio without HTTP, scheduling or batch churn, so it shows what
the corrections themselves cost on this device. `--model random` builds a SmolLM2-135M-shaped model with random
weights, for machines without a copy of the real one (the step time does not depend on the values).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .synthetic import bench_model, random_adapter

# variant name -> (the plan to apply first, None: the base; the context its steps run in)
Variants = dict[str, tuple[Any, Callable[[], Any]]]


def zipf_rows(rows: int, sets: int, seed: int = 0) -> list[int]:
    """Each row's set, drawn with p(k) proportional to 1/(k+1), as in `shira bench serve`."""
    rng = random.Random(seed)
    return rng.choices(range(sets), [1.0 / (k + 1) for k in range(sets)], k=rows)


class StepTimer:
    """Decode steps of a fixed prefilled batch, timed one by one (synchronized on CUDA)."""

    def __init__(self, model: torch.nn.Module, rows: int, prompt_len: int = 40, decode_step: Any = None) -> None:
        self.model = model
        self.decode_step = decode_step  # shira_core.decode.DecodeStep, as the service runs it; None: the forward
        self.device = next(model.parameters()).device
        vocab = model.get_input_embeddings().weight.shape[0]
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (rows, prompt_len), generator=gen).to(self.device)
        # transformers 5 renamed past_key_values to cache; pass whichever this version takes (as the service does).
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def start(self) -> dict[str, Any]:
        """A prefilled batch: its cache, next tokens and attention mask."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=self.ids, use_cache=True, **{self.cache_arg: cache}).logits
        mask = torch.ones(self.ids.shape, dtype=torch.long, device=self.device)
        positions = torch.full((self.ids.shape[0],), self.ids.shape[1] - 1, device=self.device)
        return {"cache": cache, "token": logits[:, -1].argmax(-1, keepdim=True), "mask": mask, "positions": positions}

    @torch.inference_mode()
    def steps_ms(self, state: dict[str, Any], context: Any, steps: int) -> list[float]:
        """Runs `steps` decode steps of the batch inside `context`; returns each one's milliseconds."""
        times = []
        for _ in range(steps):
            state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(state["mask"].shape[0], 1)], 1)
            self._sync()
            begin = time.perf_counter()
            state["positions"] = state["positions"] + 1
            with context():
                if self.decode_step is not None:
                    logits = self.decode_step(state["token"][:, 0], state["positions"], state["mask"], state["cache"])
                else:
                    logits = self.model(input_ids=state["token"], attention_mask=state["mask"], use_cache=True,
                                        **{self.cache_arg: state["cache"]}).logits[:, -1]
            state["token"] = logits.argmax(-1, keepdim=True)
            self._sync()
            times.append(1e3 * (time.perf_counter() - begin))
        return times


@dataclass
class StepReport:
    """One run's figures: `report` as `--json` prints it, and the unrounded medians the table shows."""

    report: dict[str, Any]
    ms_per_step: dict[str, float]

    def table(self) -> str:
        """One line of setup, then each variant's ms/step and single/variant ratio."""
        setup, vs = self.report["setup"], self.report["vs_single"]
        lines = [f"{setup['device']} {setup['dtype']}, {setup['rows']} rows, sets {setup['sets']} "
                 f"(host for mixed-host: {setup['host']})"]
        for name, value in self.ms_per_step.items():
            lines.append(f"{name:>10}: {value:8.2f} ms/step, single/{name} {vs[name]:.3f} "
                         f"(median of rounds {self.report['vs_single_repeat_median'][name]:.3f})")
        return "\n".join(lines)


def _mixed_variants(lm: torch.nn.Module, switcher: Any, plans: list[Any], sets: list[int],
                    host: int) -> tuple[Variants, list[Any]]:
    """The mixed and mixed-host variants, on the native kernel where it builds and on PyTorch's products
    (`-torch`); returns them with the RowCorrector that run them."""
    from shira_core.batched import RowCorrector

    variants: Variants = {}
    correctors = []
    for native in (True, False):
        corrector = RowCorrector(lm, switcher, native=native)
        if native and not corrector.native:
            continue  # no kernel here: the PyTorch variants only
        correctors.append(corrector)
        deltas = [corrector.delta(p) for p in plans]
        minus_merged = corrector.delta(plans[host], negate=True)
        mixed = corrector.decode_plan([(deltas[s],) for s in sets])
        corrector.forget_plans()  # the plan objects stay usable; this only drops the cache that holds them
        merged_plan = corrector.decode_plan([() if s == host else (deltas[s], minus_merged) for s in sets])
        suffix = "" if native else "-torch"
        variants[f"mixed{suffix}"] = (None, functools.partial(corrector.active, mixed))
        variants[f"mixed-host{suffix}"] = (plans[host], functools.partial(corrector.active, merged_plan))
    return variants, correctors


def _time_rounds(timer: StepTimer, switcher: Any, variants: Variants, correctors: list[Any], steps: int,
                 repeats: int) -> dict[str, list[list[float]]]:
    """Each variant's step times, round by round, after one warm-up round."""
    # Each variant keeps its own batch; the rounds visit them in turn for a few steps each, so drift in the
    # machine's speed over seconds hits all alike, and each round's ratios pair neighbouring steps.
    states = {name: timer.start() for name in variants}
    rounds: dict[str, list[list[float]]] = {k: [] for k in variants}
    for r in range(repeats + 1):  # round 0 warms each variant up and is not counted
        for name, (applied, context) in variants.items():
            if applied is None:
                switcher.revert()
            else:
                switcher.apply(applied)
            for corrector in correctors:  # as the service does after a mixed batch: plain steps carry no wrappers,
                corrector.forget_plans()  # and one RowCorrector' wrappers never sit over the other's
            times = timer.steps_ms(states[name], context, steps if r else 2)
            if r:
                rounds[name].append(times)
    return rounds


def measure(*, model: str = "default", layers: int = 30, device: str = "auto", dtype: str = "auto",
            rows: int = 8, adapters: int = 8, density: float = 0.01, steps: int = 5,
            repeats: int = 10, decode: str = "native") -> StepReport:
    """Times `steps` decode steps of each variant in each of `repeats` rounds: the ms/step medians and the
    ratios against `single`, over all steps and round by round. `decode`: "native" runs the service's decode path
    (shira_core.decode) where it applies, "torch" transformers' forward with PyTorch's linears."""
    from shira_core.decode import DecodeStep, use_decode_linears
    from shira_core.models import linear_weight_names, pick_device, pick_serving_dtype
    from shira_core.switcher import Switcher

    dev = pick_device(device)
    dt = str(pick_serving_dtype(dtype, dev)[0]).replace("torch.", "")
    lm = bench_model({"base": model, "layers": layers, "device": str(dev), "dtype": dt}).eval()
    names = linear_weight_names(lm)
    switcher = Switcher(lm)
    plans = [switcher.prepare([(random_adapter(lm, names, density, seed=100 + k, name=f"bench-{k}"), 1.0)])
             for k in range(adapters)]
    sets = zipf_rows(rows, adapters)
    host = Counter(sets).most_common(1)[0][0]
    step = None
    if decode == "native":
        use_decode_linears(lm)
        step = DecodeStep.for_model(lm)
    timer = StepTimer(lm, rows, decode_step=step)
    variants: Variants = {"base": (None, contextlib.nullcontext), "single": (plans[0], contextlib.nullcontext)}
    mixed, correctors = _mixed_variants(lm, switcher, plans, sets, host)
    variants.update(mixed)
    rounds = _time_rounds(timer, switcher, variants, correctors, steps, repeats)
    switcher.revert()
    for corrector in correctors:
        corrector.close()
    corrector = correctors[-1]  # PyTorch's, which every layer can run
    ms = {k: statistics.median(t for times in v for t in times) for k, v in rounds.items()}
    by_round = {k: [statistics.median(times) for times in v] for k, v in rounds.items()}
    paired = {k: [s / t for s, t in zip(by_round["single"], v, strict=True)] for k, v in by_round.items()}
    report = {
        "setup": {"model": model, "device": str(dev), "dtype": dt, "rows": rows, "sets": sets, "host": host,
                  "adapters": adapters, "density": density, "steps": steps, "repeats": repeats,
                  "corrected_layers": len(corrector.layers), "guest_dtype": str(corrector.dtype).replace("torch.", ""),
                  "native_kernel": correctors[0].native, "decode": "native" if step is not None else "torch"},
        "ms_per_step": {k: round(v, 3) for k, v in ms.items()},
        "ms_per_step_by_repeat": {k: [round(x, 3) for x in v] for k, v in by_round.items()},
        "vs_single": {k: round(ms["single"] / v, 3) for k, v in ms.items()},
        "vs_single_by_repeat": {k: [round(x, 3) for x in v] for k, v in paired.items()},
        "vs_single_repeat_median": {k: round(statistics.median(v), 3) for k, v in paired.items()},
    }
    return StepReport(report, ms)
