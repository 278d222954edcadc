"""One policy registry for run, replay, train and bench: a `policy` config section (told
apart by its `kind`) -> the policy object. A new controller is its module, its config
in `PolicyConfig` and one line in `FACTORIES`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from policies.contract import Policy
from policies.control import CONTROL_CONFIGS, ControlPolicyConfigs, make_control_policy
from policies.feedback import LaserOff, LaserOffConfig, ProportionalTrap, ProportionalTrapConfig
from policies.rl.policy import RlPolicy, RlPolicyConfig

PolicyConfig = Annotated[
    ProportionalTrapConfig | LaserOffConfig | ControlPolicyConfigs | RlPolicyConfig,
    Field(discriminator="kind"),
]

FACTORIES: dict[type[BaseModel], Callable[[Any], Policy]] = {
    ProportionalTrapConfig: ProportionalTrap,
    LaserOffConfig: LaserOff,
    RlPolicyConfig: RlPolicy,
    **dict.fromkeys(CONTROL_CONFIGS, make_control_policy),
}


def make_policy(config: BaseModel) -> Policy:
    """The policy a config section describes; ValueError naming `policy.kind` if unknown."""
    factory = FACTORIES.get(type(config))
    if factory is None:
        raise ValueError(
            f"policy.kind: no policy is registered for {type(config).__name__} "
            f"(registered: {sorted(c.__name__ for c in FACTORIES)})"
        )
    return factory(config)


def parse_policy_config(data: BaseModel | dict[str, Any]) -> BaseModel:
    """A registered policy config from a model or a mapping; ValueError in one line."""
    if type(data) in FACTORIES:
        return data  # type: ignore[return-value]
    raw = data.model_dump() if isinstance(data, BaseModel) else data
    try:
        return TypeAdapter(PolicyConfig).validate_python(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        if not where and err["type"].startswith("union_tag"):
            where = "kind"  # an unknown or missing `kind`: the registry has no such policy
        field = f"policy.{where}" if where else "policy"
        raise ValueError(f"{field}: {err['msg']}") from None
