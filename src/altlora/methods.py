"""Method registry: every method of the AltLoRA paper's comparisons, runnable by name.

A *method* is (a) how the model is adapted (PEFT ``LoraConfig`` / ``AdaLoraConfig`` and the
initialisation) and (b) which optimizer trains it::

    from altlora import methods
    m = methods.get("lora_pro")
    model = m.adapt(base_model, {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]})
    opt = m.create_optimizer(model, lr=2e-5)
    methods.list_methods()          # structured: names, descriptions, hyperparameters, defaults

Initialisation ablation (the paper's Table 11): ``adapt(model, init="spectral/zero")`` sets A and
B of every LoRA pair from {gaussian, kaiming, zero, spectral}; exactly one must be ``zero``, so
the adapted model starts equal to the pretrained one.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .factory import OPTIMIZERS, create_optimizer
from .optim import REGISTRY
from .validate import closest
from .pairing import find_lora_pairs

__all__ = ["Method", "MethodError", "METHODS", "ALIASES", "INITS", "get", "list_methods",
           "names", "apply_init", "DEFAULT_LORA"]

#: LoraConfig values used unless the caller's ``lora_options`` say otherwise (paper: r 8, alpha 16).
DEFAULT_LORA: dict[str, Any] = dict(r=8, lora_alpha=16, lora_dropout=0.0)
#: Table 11 initialisations for one factor.
INITS = ("gaussian", "kaiming", "zero", "spectral")


class MethodError(ValueError):
    """Unknown method, or a method whose requirements are not met."""


def _signature_defaults(obj: Callable) -> dict[str, Any]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    out = {}
    for name, p in inspect.signature(target).parameters.items():
        if name in ("self", "params", "model", "pairs") or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.default is not p.empty:
            out[name] = p.default
    return out


@dataclass(frozen=True, eq=False)
class Method:
    """One runnable method. Build with :func:`get`; see :meth:`adapt` and :meth:`create_optimizer`."""

    name: str
    description: str
    optimizer: str                                   # key of factory.OPTIMIZERS
    adapter: str = "lora"                            # "full", "lora", "adalora" or "lora_ga"
    lora_fixed: dict = field(default_factory=dict)   # LoraConfig values the method defines
    lora_defaults: dict = field(default_factory=dict)  # LoraConfig defaults the method changes
    optimizer_defaults: dict = field(default_factory=dict)
    accepts_init: bool = True                        # Table 11 init choices allowed
    requires: tuple[str, ...] = ()                   # adapt() arguments that must be given

    # ------------------------------------------------------------------ discovery
    def hyperparameters(self) -> dict[str, Any]:
        """Optimizer hyperparameters with this method's defaults."""
        source = OPTIMIZERS[self.optimizer][0]
        hp = _signature_defaults(source)
        hp.update(self.optimizer_defaults)
        if hasattr(source, "convention_defaults"):  # options left at None take the convention's value
            filled = source.convention_defaults(hp["convention"])
            hp.update({k: v for k, v in filled.items() if hp.get(k) is None})
        return hp

    def default_lr(self) -> float:
        """The learning rate used when none is given: the optimizer's own default."""
        return float(self.hyperparameters().get("lr", 1e-3))

    @property
    def clips_in_own_geometry(self) -> bool:
        """Its optimizer takes ``max_grad_norm`` and clips the step it makes (AltLoRA, AltLoRA+),
        so a training loop must not clip the raw gradients before it."""
        return bool(getattr(OPTIMIZERS[self.optimizer][0], "clips_in_own_geometry", False))

    @property
    def trains_experts(self) -> bool:
        """Can adapt with mixture-of-LoRA-experts layers: plain PEFT LoRA, no fixed init or DoRA."""
        fixed = set(self.lora_fixed) - {"use_rslora"}
        return self.adapter == "lora" and not fixed

    def adapter_options(self) -> dict[str, Any]:
        """The PEFT config fields this method uses unless ``lora_options`` override them."""
        return {} if self.adapter == "full" else self._lora_options(None)

    def describe(self) -> dict[str, Any]:
        return dict(name=self.name, description=self.description, optimizer=self.optimizer,
                    adapter=self.adapter, adapter_options=self.adapter_options(),
                    hyperparameters=self.hyperparameters(), requires=list(self.requires),
                    accepts_init=self.accepts_init,
                    aliases=sorted(a for a, t in ALIASES.items() if t == self.name))

    # ------------------------------------------------------------------ adaptation
    def adapt(self, model: nn.Module, lora_options: dict | None = None, *, init: str | tuple | None = None,
              total_steps: int | None = None, init_batches: Iterable[dict] | None = None,
              train_step: Callable[[], None] | None = None, lora_ga_options: dict | None = None,
              experts: int = 1, router_top_k: int = 0) -> nn.Module:
        """Adapt ``model`` for this method and return it (a PEFT model, or ``model`` for ``full``).

        Args:
            lora_options: ``LoraConfig`` fields (r, lora_alpha, target_modules, task_type, ...).
            init: Table 11 initialisation ``"A_init/B_init"`` or a tuple, e.g. ``"spectral/zero"``.
            total_steps: AdaLoRA's ``total_step`` (required for ``adalora``).
            init_batches: LoRA-GA gradient-estimation batches (dicts of model inputs with labels),
                or ``train_step``: a callable running forward + backward on them.
            lora_ga_options: ``peft.LoraGAConfig`` fields (direction, scale, stable_gamma).
            experts: > 1 makes every adapted linear layer a mixture of that many LoRA experts
                with a router (:mod:`altlora.moe`, the paper's Table 10); ``router_top_k`` > 0
                keeps only the k largest gates per token.
        """
        self._check_requirements(total_steps, init_batches, train_step)
        if experts > 1 and not self.trains_experts:
            able = ", ".join(m for m in names() if METHODS[m].trains_experts)
            raise MethodError(f"method {self.name!r} cannot train a mixture of LoRA experts (its adapter or "
                              f"initialisation is not plain LoRA); methods that can: {able}")
        if init is not None and not self.accepts_init:
            raise MethodError(f"method {self.name!r} defines its own initialisation; init={init!r} "
                              "applies to LoRA methods with the default PEFT init (e.g. 'lora', 'altlora')")
        a_init, b_init = _parse_init(init) if init is not None else (None, None)
        if self.adapter == "full":
            if lora_options:
                raise MethodError(f"method {self.name!r} trains every weight; lora_options do not apply")
            for p in model.parameters():
                p.requires_grad_(True)
            return model
        options = self._lora_options(lora_options)
        import peft

        if self.adapter == "adalora":
            config = peft.AdaLoraConfig(total_step=total_steps, **options)
        elif self.adapter == "lora_ga":
            config = peft.LoraConfig(init_lora_weights="lora_ga",
                                     lora_ga_config=peft.LoraGAConfig(**(lora_ga_options or {})), **options)
            if train_step is None:
                batches = list(init_batches)

                def train_step() -> None:
                    for b in batches:
                        model(**b).loss.backward()

            from peft.tuners.lora import preprocess_loraga
            preprocess_loraga(model, config, train_step)
        else:
            config = peft.LoraConfig(**options)
            if experts > 1:
                from . import moe

                moe.register(config, experts, router_top_k)
        adapted = peft.get_peft_model(model, config)
        if a_init is not None:
            apply_init(adapted, a_init, b_init)
        return adapted

    def _lora_options(self, user: dict | None) -> dict:
        user = dict(user or {})
        for k, v in self.lora_fixed.items():
            if k in user and user[k] != v:
                raise MethodError(f"method {self.name!r} sets {k}={v!r}; got {k}={user[k]!r} in lora_options")
        options = {**DEFAULT_LORA, **self.lora_defaults, **user, **self.lora_fixed}
        if self.adapter == "adalora":  # AdaLoRA: r is the final budget, init_r the starting rank
            options.setdefault("target_r", options.pop("r"))
            options.setdefault("init_r", math.ceil(options["target_r"] * 1.5))
        return options

    def _check_requirements(self, total_steps, init_batches, train_step) -> None:
        if "total_steps" in self.requires and (not isinstance(total_steps, int) or total_steps <= 0):
            raise MethodError(
                f"method {self.name!r} needs the number of training steps for its rank schedule: "
                f"pass adapt(..., total_steps=N) with N > 0 (got {total_steps!r})")
        if "init_batches" in self.requires and init_batches is None and train_step is None:
            raise MethodError(
                f"method {self.name!r} initialises from estimated full-weight gradients and needs a "
                "gradient-estimation batch: pass adapt(..., init_batches=[batch, ...]) (dicts of model "
                "inputs including labels) or train_step=callable running forward + backward")

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: nn.Module, lr: float | None = None, **hyperparams: Any) -> torch.optim.Optimizer:
        """Build this method's optimizer for an adapted ``model``; ``hyperparams`` override defaults."""
        hp = {**self.optimizer_defaults, **hyperparams}
        if lr is None:
            lr = self.default_lr()
        return create_optimizer(model, self.optimizer, lr=lr, **hp)


def _parse_init(init: str | tuple) -> tuple[str, str]:
    parts = tuple(init.replace(",", "/").split("/")) if isinstance(init, str) else tuple(init)
    if len(parts) != 2 or any(p not in INITS for p in parts):
        raise MethodError(f"init must be 'A_init/B_init' with each of {', '.join(INITS)}; got {init!r}")
    if (parts[0] == "zero") == (parts[1] == "zero"):
        raise MethodError(
            f"init {init!r}: exactly one factor must be 'zero' (so the adapted model starts equal to the "
            "pretrained one, and the other factor can carry gradient)")
    return parts  # type: ignore[return-value]


def _base_matrix(module: nn.Module, kind: str) -> torch.Tensor:
    """W0 as a (k, d) matrix matching ``B @ A`` for the layer kind."""
    w = module.get_base_layer().weight.detach().float()
    if kind == "embedding" or getattr(module, "fan_in_fan_out", False):
        return w.T
    return w.reshape(w.shape[0], -1)


@torch.no_grad()
def apply_init(model: nn.Module, a_init: str, b_init: str) -> None:
    """Set every LoRA pair of ``model`` to the Table 11 initialisation ``(a_init, b_init)``.

    gaussian: N(0, 1/r^2) (PEFT's "gaussian"); kaiming: Kaiming-uniform(a=sqrt 5) on the
    matrix (PEFT's default for A); zero; spectral: top-r singular vectors of W0 (``A = V_r^T``,
    ``B = U_r``, unit norm, no singular values).
    """
    _parse_init((a_init, b_init))
    for pair in find_lora_pairs(model):
        r = pair.rank
        mats = {"A": pair.A.reshape(r, -1), "B": pair.B.reshape(pair.B.shape[0], -1)}
        svd = None
        for which, how in (("A", a_init), ("B", b_init)):
            m = torch.empty(mats[which].shape, dtype=torch.float32)
            if how == "zero":
                m.zero_()
            elif how == "gaussian":
                m.normal_(0.0, 1.0 / r)
            elif how == "kaiming":
                nn.init.kaiming_uniform_(m, a=math.sqrt(5))
            else:
                if svd is None:
                    svd = torch.linalg.svd(_base_matrix(model.get_submodule(pair.name), pair.kind),
                                           full_matrices=False)
                U, _, Vh = svd
                m = Vh[:r] if which == "A" else U[:, :r]
            target = pair.A if which == "A" else pair.B
            target.copy_(m.reshape(target.shape))


# ----------------------------------------------------------------------------- registry
def _m(name: str, description: str, optimizer: str, **kw: Any) -> Method:
    return Method(name=name, description=description, optimizer=optimizer, **kw)


def _of_optimizer(cls: type) -> Method:
    """The method an optimizer class defines: PEFT LoRA (or the class's own ``adapter``) + the class."""
    adapter = getattr(cls, "adapter", "lora")
    return Method(name=cls.name, description=cls.description, optimizer=cls.name, adapter=adapter,
                  accepts_init=adapter == "lora", requires=tuple(getattr(cls, "requires", ())))


METHODS: dict[str, Method] = {m.name: m for m in [
    # one per optimizer class of the registry (altlora.optim.REGISTRY, aliases left out)
    *(_of_optimizer(cls) for name, cls in REGISTRY.items() if name == cls.name),
    # other adapters or initialisations, trained by AdamW
    _m("full", "Full fine-tuning: AdamW on every weight, no adapter", "adamw", adapter="full", accepts_init=False),
    _m("pissa", "PiSSA: A, B from the top-r SVD of W0 (residual kept frozen), AdamW", "lora",
       lora_fixed=dict(init_lora_weights="pissa"), accepts_init=False),
    _m("rslora", "rsLoRA: scaling alpha/sqrt(r), AdamW", "lora", lora_fixed=dict(use_rslora=True)),
    _m("dora", "DoRA: magnitude/direction decomposition, AdamW", "lora", lora_fixed=dict(use_dora=True)),
    _m("lora_ga", "LoRA-GA: A, B from the SVD of estimated full gradients (rsLoRA), AdamW", "lora",
       adapter="lora_ga", lora_defaults=dict(use_rslora=True), accepts_init=False, requires=("init_batches",)),
    # ablations (Table 9: update order and joint updates; ranks via lora_options={"r": ...}).
    # Both methods update jointly by default, AltLoRA+ with a ridge relative to the Gram.
    _m("altlora_alternating", "AltLoRA ablation: alternate (Algorithm 1's order; B first when B = 0)",
       "altlora", optimizer_defaults=dict(mode="alternating")),
    _m("altlora_b_first", "AltLoRA ablation: alternate starting with B", "altlora",
       optimizer_defaults=dict(mode="alternating", first="B")),
    _m("altlora_plus_alternating", "AltLoRA+ ablation: alternate (Algorithm 2's order), absolute ridge",
       "altlora_plus", optimizer_defaults=dict(mode="alternating", relative_ridge=0.0)),
    _m("altlora_plus_b_first", "AltLoRA+ ablation: alternate starting with B", "altlora_plus",
       optimizer_defaults=dict(mode="alternating", first="B")),
    _m("altlora_plus_joint", "AltLoRA+ ablation: joint updates with the absolute ridge", "altlora_plus",
       optimizer_defaults=dict(relative_ridge=0.0)),
]}

#: Research-code names (LucasXinYu/AltLoRA ``--optim``) and other spellings -> registry names.
ALIASES: dict[str, str] = {"adamw": "full", "loraplus": "lora_plus", "lorapro": "lora_pro",
                           "lora_pro_adamw": "lora_pro", "loraga": "lora_ga",
                           "altlora_joint": "altlora"}  # joint updates became AltLoRA's default


def names(include_aliases: bool = False) -> list[str]:
    return sorted(METHODS) + (sorted(ALIASES) if include_aliases else [])


def get(name: str) -> Method:
    """The method registered as ``name`` (or an alias); unknown names list the valid ones."""
    key = ALIASES.get(name, name)
    if key not in METHODS:
        valid = names(include_aliases=True)
        raise MethodError(f"unknown method {name!r}; valid names: {', '.join(valid)}.{closest(name, valid)}")
    return METHODS[key]


def list_methods() -> list[dict[str, Any]]:
    """Every method as a dict (name, description, optimizer, adapter options, hyperparameters
    with defaults, requirements, aliases), sorted by name, for ``altlora list methods``."""
    return [METHODS[n].describe() for n in sorted(METHODS)]
