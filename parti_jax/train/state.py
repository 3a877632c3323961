"""TrainState: everything a run needs to continue exactly where it stopped.

One pytree holds the step, the trained parameters, the optimizer state, the
base random key and any non-trained model variables. The optimizer
(`tx`) is static (not a leaf), so the state passes through `jax.jit` and orbax
as plain arrays.

Several parameter groups (the VQGAN's generator and discriminator, each with
its own optimizer) use the same class: pass `tx` as a dict of optimizers and
`params` as a dict with the same keys, then

    state = TrainState.create(params={'generator': g, 'discriminator': d},
                              tx={'generator': g_tx, 'discriminator': d_tx}, rng=key)
    state = state.apply_gradients({'generator': g_grads}, increment_step=False)
    state = state.apply_gradients({'discriminator': d_grads})   # step + 1

Randomness is a pure function of (rng, step): `state.step_rng('dropout')`
gives the same key for the same step after a resume, on any host count.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

PyTree = Any


class TrainState(struct.PyTreeNode):
    """Step, params, optimizer state, base rng and extra model variables."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: PyTree  # trained parameters (one tree, or {group: tree})
    opt_state: PyTree  # optax state (one, or {group: state})
    rng: jax.Array  # base key, raw uint32[2]; per-step keys are folded from it
    model_state: PyTree = struct.field(default_factory=dict)  # e.g. batch_stats, EMA
    tx: Any = struct.field(pytree_node=False, default=None)  # GradientTransformation(s)

    @classmethod
    def create(
        cls,
        *,
        params: PyTree,
        tx: optax.GradientTransformation | Mapping[str, optax.GradientTransformation],
        rng: jax.Array,
        model_state: PyTree | None = None,
    ) -> TrainState:
        """A state at step 0; `tx` may be a dict of optimizers, one per params group."""
        if isinstance(tx, Mapping):
            if not isinstance(params, Mapping) or set(params) != set(tx):
                got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
                raise ValueError(
                    f"TrainState.create: with several optimizers, params must be a dict with the "
                    f"same keys as tx; tx has {sorted(tx)}, params has {got}"
                )
            opt_state = {k: tx[k].init(params[k]) for k in tx}
        else:
            opt_state = tx.init(params)
        rng = jnp.asarray(rng)
        if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
            rng = jax.random.key_data(rng)
        return cls(
            step=jnp.zeros([], jnp.int32),
            params=params,
            opt_state=opt_state,
            rng=rng,
            model_state={} if model_state is None else model_state,
            tx=tx,
        )

    def apply_gradients(self, grads: PyTree, *, increment_step: bool = True) -> TrainState:
        """Applies `grads` with the optimizer(s); with several groups, `grads` is
        {group: grads} for any subset of the groups."""
        if isinstance(self.tx, Mapping):
            unknown = set(grads) - set(self.tx)
            if unknown:
                raise ValueError(
                    f"apply_gradients: unknown params group(s) {sorted(unknown)}; "
                    f"groups are {sorted(self.tx)}"
                )
            params = dict(self.params)
            opt_state = dict(self.opt_state)
            for k, g in grads.items():
                updates, opt_state[k] = self.tx[k].update(g, self.opt_state[k], self.params[k])
                params[k] = optax.apply_updates(self.params[k], updates)
        else:
            updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
            params = optax.apply_updates(self.params, updates)
        step = self.step + 1 if increment_step else self.step
        return self.replace(step=step, params=params, opt_state=opt_state)

    def step_rng(self, name: str | int = 0) -> jax.Array:
        """A raw key for this step and purpose: fold_in(fold_in(rng, step), name)."""
        key = jax.random.fold_in(self.rng, self.step)
        salt = name if isinstance(name, int) else zlib.crc32(name.encode()) & 0x7FFFFFFF
        return jax.random.fold_in(key, salt)

    def checkpoint_items(self) -> dict[str, PyTree]:
        """The arrays saved in a checkpoint (everything but the optimizer object)."""
        return {
            "step": self.step,
            "params": self.params,
            "opt_state": self.opt_state,
            "rng": self.rng,
            "model_state": self.model_state,
        }

    def replace_checkpoint_items(self, items: Mapping[str, PyTree]) -> TrainState:
        """The inverse of `checkpoint_items`."""
        return self.replace(**{k: items[k] for k in self.checkpoint_items()})


# ------------------------------------------------------------ sharded creation


def sharded_train_state(
    init_fn: Any,
    tx: optax.GradientTransformation | Mapping[str, optax.GradientTransformation],
    *,
    mesh: jax.sharding.Mesh,
    rules: Any,
    rng: jax.Array,
    init_rng: jax.Array | None = None,
    abstract: bool = False,
) -> tuple[TrainState, TrainState]:
    """(state, state shardings): a TrainState initialised directly in its shardings.

    `init_fn(key) -> variables` (flax `model.init`, boxed with logical axis
    names; with several param groups it returns {group: variables}).
    Parameters follow their logical axes through `rules`, optimizer state its
    parameters (`optimizers.optimizer_state_shardings`), other variables go
    into `model_state`; a dim that does not divide its mesh axes fails before
    anything compiles, naming the parameter. The state is created by one jit
    with `out_shardings`, so no parameter is ever materialised on one device;
    with `abstract=True` nothing is compiled or allocated and the state is
    ShapeDtypeStructs carrying their shardings (a restore target).
    `init_rng` seeds the parameters (default `rng`); `rng` is the state's
    base key (dropout, ...).
    """
    import flax.linen as nn

    from parti_jax import partitioning
    from parti_jax.train.optimizers import optimizer_state_shardings

    init_rng = rng if init_rng is None else init_rng

    def make(init_key, key):
        params, rest = _split_variables(nn.unbox(init_fn(init_key)), tx)
        return TrainState.create(params=params, tx=tx, rng=key, model_state=rest)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init_fn, init_rng)
        partitioning.check_divisibility(boxed, mesh, rules)
        var_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
        param_shardings, rest_shardings = _split_variables(var_shardings, tx)
        shapes = jax.eval_shape(make, init_rng, rng)
        if isinstance(tx, Mapping):
            opt_shardings = {
                k: optimizer_state_shardings(shapes.opt_state[k], param_shardings[k], mesh)
                for k in tx
            }
        else:
            opt_shardings = optimizer_state_shardings(shapes.opt_state, param_shardings, mesh)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        shardings = shapes.replace(
            step=replicated,
            params=param_shardings,
            opt_state=opt_shardings,
            rng=replicated,
            model_state=rest_shardings,
        )
        if abstract:
            state = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
            )
        else:
            state = jax.jit(make, out_shardings=shardings)(init_rng, rng)
    return state, shardings


def _split_variables(variables: PyTree, tx: Any) -> tuple[PyTree, PyTree]:
    """(params, other collections); per group when `tx` is a dict of optimizers."""
    if isinstance(tx, Mapping):
        params = {k: v["params"] for k, v in variables.items()}
        rest = {k: {c: x for c, x in v.items() if c != "params"} for k, v in variables.items()}
    else:
        params = variables["params"]
        rest = {c: x for c, x in variables.items() if c != "params"}
    return params, rest
