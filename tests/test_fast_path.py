"""The fast path of LAMB and LARS equals their per-variable reference path.

The optimizers step all variables in one call or, inside `tf.distribute`, one
variable at a time; the private flag `_use_reference_path` selects the papers'
equations written out per variable. These tests run all of them on the same
variables and gradients. Backend-agnostic: runs under TensorFlow and again
under JAX and torch (tests/test_jax_backend.py, test_torch_backend.py), where
the whole step is the grouped `torch._foreach_*` step of
`keras_lamb.torch_step`.
"""

import keras
import numpy as np
import pytest

import keras_lamb
from conftest import BACKEND, TOLERANCES
from keras_lamb import layerwise
from keras_lamb.trust_ratio import (
    SUM_OF_SQUARES_METHODS,
    sum_of_squares,
    sums_of_squares,
)

# Edge cases first, then random shapes: a scalar, one element, a zero
# variable, a zero gradient (no weight decay: a zero update), a long vector
# without a divisor in [128, 2048] (no row view), one with (row view), and
# large tensors.
FIXED_SPECS = [
    # (path, shape, weight scale, gradient scale)
    ("scale/kernel", (), 1.5, 0.3),
    ("one/bias", (1,), 0.2, 1.0),
    ("zeros/kernel", (3, 4), 0.0, 1.0),
    ("frozen/bias", (5, 2), 1.0, 0.0),
    ("long/bias", (70001,), 0.1, 0.01),
    ("wide/bias", (81920,), 0.1, 0.01),
    ("big/kernel", (700, 300), 0.05, 0.002),
    ("conv/kernel", (3, 3, 16, 32), 0.1, 0.05),
    ("layer_norm/gamma", (64,), 1.0, 0.01),
]
DECAY_EXCLUDED = "layer_norm|bias"
ADAPTATION_EXCLUDED = "one/bias|layer_norm"


def random_specs(seed, count=6):
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(count):
        rank = int(rng.integers(0, 5))
        shape = tuple(int(d) for d in rng.integers(1, 40, size=rank))
        specs.append((f"random{i}/{'bias' if rank == 1 else 'kernel'}",
                      shape, float(10 ** rng.uniform(-3, 1)),
                      float(10 ** rng.uniform(-3, 1))))
    return specs


def make_variables(specs, dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    variables = []
    for path, shape, scale, _ in specs:
        scope, name = path.split("/")
        with keras.name_scope(scope):
            variables.append(keras.Variable(
                scale * rng.standard_normal(shape), dtype=dtype, name=name))
    return variables


def make_gradients(specs, step, dtype="float32"):
    rng = np.random.default_rng([7, step])
    return [keras.ops.convert_to_tensor(
        g_scale * rng.standard_normal(shape), dtype=dtype)
        for _, shape, _, g_scale in specs]


class PerVariable:
    """Mixin: overriding `update_step` makes Keras call it per variable, as
    inside `tf.distribute`, which takes the one-variable fast path."""

    def update_step(self, gradient, variable, learning_rate):
        return super().update_step(gradient, variable, learning_rate)


class PerVariableLAMB(PerVariable, keras_lamb.LAMB):
    pass


class PerVariableLARS(PerVariable, keras_lamb.LARS):
    pass


LAMB_CONFIGS = {
    "paper": {},
    "bounds_no_bias_correction": {
        "trust_ratio_bounds": (0.05, 2.0), "epsilon": 1e-3,
        "bias_correction": False,
    },
    "lambc": {"clip_trust_ratio": True},
}
LARS_CONFIGS = {
    "mlperf": {},
    "nesterov_larc": {"nesterov": True, "clip_trust_ratio": True,
                      "epsilon": 1e-5},
}


# The fast path's variants: the whole step, one variable at a time, and with
# both norms of a variable reduced in one pass (stacked, in each way of
# forming the sums, or in one multi-output reduction).
FAST_PATHS = ["whole", "per_variable", "joint_reduce", "joint_matvec",
              "joint_rows", "joint_multi_output", "recompute"]


def make_optimizer(name, config, path):
    """`path`: "reference" or one of `FAST_PATHS`."""
    if name == "lamb":
        cls = PerVariableLAMB if path == "per_variable" else keras_lamb.LAMB
        kwargs = dict(learning_rate=0.05, weight_decay=0.1)
    else:
        cls = PerVariableLARS if path == "per_variable" else keras_lamb.LARS
        kwargs = dict(learning_rate=0.5, weight_decay=0.01,
                      trust_coefficient=0.02)
    opt = cls(exclude_from_weight_decay=DECAY_EXCLUDED,
              exclude_from_layer_adaptation=ADAPTATION_EXCLUDED,
              track_trust_ratios=True, **kwargs, **config)
    opt._use_reference_path = path == "reference"
    if path == "recompute":  # LAMB's update formed twice, not stored
        opt._recompute_update = True
    if path.startswith("joint_"):
        opt._joint_norms = True
        opt._norm_method = path[len("joint_"):]
    return opt


def run(optimizer, specs, steps=3, dtype="float32"):
    variables = make_variables(specs, dtype)
    for step in range(steps):
        optimizer.apply(make_gradients(specs, step, dtype), variables)
    state = [np.array(v, dtype="float64") for v in variables]
    state += [np.array(v, dtype="float64") for v in optimizer.variables
              if v.dtype != "int64" and len(v.shape) > 0]
    return state, optimizer.trust_ratio_stats()


def assert_same(a, b, dtype="float32"):
    (state_a, stats_a), (state_b, stats_b) = a, b
    tol = TOLERANCES[dtype]
    assert len(state_a) == len(state_b)
    for x, y in zip(state_a, state_b):
        np.testing.assert_allclose(x, y, **tol)
    assert stats_a.keys() == stats_b.keys()
    for path in stats_a:
        for stat in stats_a[path]:
            np.testing.assert_allclose(
                stats_a[path][stat], stats_b[path][stat], rtol=1e-4,
                atol=1e-7, err_msg=f"{path} {stat}")


CONFIGS = {"lamb": LAMB_CONFIGS, "lars": LARS_CONFIGS}
SPEC_SEEDS = {"lamb": 1, "lars": 2}


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("name, config", [
    (name, config) for name, configs in CONFIGS.items() for config in configs
])
def test_fast_path_equals_reference(name, config, path):
    specs = FIXED_SPECS + random_specs(SPEC_SEEDS[name])
    config = CONFIGS[name][config]
    reference = run(make_optimizer(name, config, "reference"), specs)
    fast = run(make_optimizer(name, config, path), specs)
    assert_same(fast, reference)


@pytest.mark.parametrize("name, dtype", [("lamb", "bfloat16"),
                                         ("lars", "float16")])
def test_low_precision_variables(name, dtype):
    # bfloat16/float16 variables and slots; norms and math in float32.
    specs = FIXED_SPECS[:4] + random_specs(3, count=3)
    config = {} if name == "lamb" else {"nesterov": True}
    reference = run(make_optimizer(name, config, "reference"), specs,
                    dtype=dtype)
    fast = run(make_optimizer(name, config, "whole"), specs, dtype=dtype)
    assert_same(fast, reference, dtype)


@pytest.mark.skipif(BACKEND != "torch", reason="the torch fast path")
@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_torch_whole_step_takes_the_foreach_path(name, monkeypatch):
    # The comparisons above check the grouped torch._foreach_* step only
    # if the whole step really goes through it.
    from keras_lamb import torch_step

    calls = []
    original = getattr(torch_step, f"{name}_update")

    def spy(*args):
        calls.append(len(args[2]))
        return original(*args)

    monkeypatch.setattr(torch_step, f"{name}_update", spy)
    run(make_optimizer(name, {}, "whole"), FIXED_SPECS, steps=2)
    assert calls == [len(FIXED_SPECS)] * 2


@pytest.mark.skipif(BACKEND != "torch", reason="the torch fast path")
@pytest.mark.parametrize("config", LARS_CONFIGS)
def test_torch_lars_in_small_blocks(config, monkeypatch):
    # The torch LARS step moves the weights block by block; with blocks of
    # 1000 values, the large variables are cut into slices (the last one
    # shorter) and the small ones grouped, unlike at the default size.
    from keras_lamb import torch_step

    monkeypatch.setattr(torch_step, "BLOCK", 1000)
    specs = FIXED_SPECS + random_specs(SPEC_SEEDS["lars"])
    reference = run(make_optimizer("lars", LARS_CONFIGS[config],
                                   "reference"), specs)
    fast = run(make_optimizer("lars", LARS_CONFIGS[config], "whole"), specs)
    assert_same(fast, reference)


def test_the_step_changes_the_variables():
    # Guards the comparisons above against a path that does nothing.
    specs = FIXED_SPECS + random_specs(1)
    before = [np.array(v) for v in make_variables(specs)]
    after, _ = run(make_optimizer("lamb", {}, "whole"), specs, steps=1)
    moved = [not np.allclose(a, b) for a, b in zip(before, after)]
    # The zero variable moves too (trust ratio 1); the zero gradient without
    # weight decay does not.
    assert moved == [path != "frozen/bias" for path, *_ in specs]


SUM_SHAPES = [(), (1,), (7, 3), (70001,), (81920,), (700, 300),
              (3, 3, 16, 32)]


@pytest.mark.parametrize("method", SUM_OF_SQUARES_METHODS)
def test_sum_of_squares_equals_numpy(method):
    rng = np.random.default_rng(5)
    for shape in SUM_SHAPES:
        x = rng.standard_normal(shape).astype("float32")
        got = sum_of_squares(keras.ops.convert_to_tensor(x), method)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(got),
                                   np.sum(x.astype("float64") ** 2),
                                   rtol=1e-5, err_msg=str(shape))


@pytest.mark.parametrize("method", SUM_OF_SQUARES_METHODS)
def test_sums_of_squares_equal_numpy(method):
    rng = np.random.default_rng(8)
    for shape in SUM_SHAPES:
        xs = [scale * rng.standard_normal(shape).astype("float32")
              for scale in (1.0, 1e-3, 30.0)]
        got = sums_of_squares(
            [keras.ops.convert_to_tensor(x) for x in xs], method)
        assert len(got) == 3
        for value, x in zip(got, xs):
            np.testing.assert_allclose(
                keras.ops.convert_to_numpy(value),
                np.sum(x.astype("float64") ** 2), rtol=1e-5,
                err_msg=str(shape))


def test_unknown_sum_of_squares_method():
    x = keras.ops.ones((3,))
    with pytest.raises(ValueError, match="'l1'.*expected one of"):
        sum_of_squares(x, "l1")
    with pytest.raises(ValueError, match="'l1'.*expected one of"):
        sums_of_squares([x, x], "l1")


def test_defaults_on_this_machine():
    # The CI machine has no accelerator: the CPU choices apply (see
    # `default_norm_method` and `default_joint_norms` for the measurements).
    assert not layerwise.on_accelerator()
    expected = {"tensorflow": "matvec", "jax": "multi_output"}.get(
        keras.backend.backend(), "reduce")
    assert layerwise.default_norm_method() == expected
    assert layerwise.default_joint_norms() is (BACKEND == "jax")
    # Outside a compiled step, LAMB stores its update (see
    # `test_compiled_lamb_step_stores_no_update` and
    # `test_jitted_lamb_step_stores_no_update` for inside).
    assert layerwise.default_recompute_for_norm() is False
    assert layerwise.default_recompute_for_norm(keras.ops.ones(3)) is False
    # LARS never stacks its norms by default.
    assert keras_lamb.LAMB()._joint_norms is None
    assert keras_lamb.LARS()._joint_norms is False
    # Both step the variables in the order XLA picks.
    assert keras_lamb.LAMB()._step_in_order is False
    assert keras_lamb.LARS()._step_in_order is False
    # Set on another backend, the switch is ignored (it is JAX's).
    if BACKEND != "jax":
        specs = FIXED_SPECS[:4]
        ordered = make_optimizer("lamb", {}, "whole")
        ordered._step_in_order = True
        assert_same(run(ordered, specs, steps=1),
                    run(make_optimizer("lamb", {}, "whole"), specs, steps=1))


def test_whole_step_only_where_allowed():
    assert keras_lamb.LAMB()._whole_step_allowed()
    assert keras_lamb.LARS()._whole_step_allowed()
    assert not PerVariableLAMB()._whole_step_allowed()
    reference = keras_lamb.LARS()
    reference._use_reference_path = True
    assert not reference._whole_step_allowed()


@pytest.mark.parametrize("name", ["lamb", "lars"])
@pytest.mark.parametrize("path", ["whole", "per_variable"])
def test_no_persistent_memory_beyond_the_slots(name, path):
    # LAMB keeps m and v per variable, LARS the momentum; everything else the
    # optimizer owns is a scalar (iteration count, learning rate), whichever
    # path stepped it. (`track_trust_ratios=True` adds four scalars per
    # variable on request; it is off here.)
    specs = FIXED_SPECS + random_specs(4)
    opt = make_optimizer(name, {}, path)
    opt.track_trust_ratios = False
    variables = make_variables(specs)
    opt.apply(make_gradients(specs, 0), variables)
    slot_shapes = sorted(
        (tuple(v.shape) for v in opt.variables if len(v.shape) > 0), key=str)
    per_variable = 2 if name == "lamb" else 1
    expected = sorted((tuple(v.shape) for v in variables if len(v.shape) > 0),
                      key=str) * per_variable
    assert slot_shapes == sorted(expected, key=str)
    scalars = [v for v in opt.variables if len(v.shape) == 0]
    # The slots of the scalar variable ("scale/kernel"), plus iterations and
    # the learning rate.
    assert len(scalars) <= per_variable + 2


def full_size_temporaries(optimizer, shape):
    """The values of `shape` that the XLA-compiled TF step of `optimizer`
    computes but does not output: buffers the compiler must allocate."""
    import re

    import tensorflow as tf

    variables = make_variables([("dense/kernel", shape, 0.1, 0.01)])
    optimizer.build(variables)
    gradient = [keras.ops.ones(shape) * 0.01]

    @tf.function(jit_compile=True)
    def step(grads):
        optimizer.apply(grads, variables)
        return optimizer.iterations

    hlo = step.experimental_get_compiler_ir(gradient)(stage="optimized_hlo")
    entry = hlo[hlo.index("\nENTRY "):]
    full = "f32[" + ",".join(str(d) for d in shape) + "]"
    computed = {name for name, kind in re.findall(
        r"%([\w.-]+) = " + re.escape(full) + r"\S* (\w+)\(", entry)
        if kind != "parameter"}
    root = entry[entry.index("ROOT "):].split("\n")[0]
    outputs = set(re.findall(r"%([\w.-]+)", root))
    return sorted(computed - outputs)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="TensorFlow's XLA:CPU compilation")
@pytest.mark.parametrize("recompute", [None, False])
def test_compiled_lamb_step_stores_no_update(recompute):
    # Compiled with XLA on a CPU, LAMB recomputes its update for the norm:
    # the step's only full-size values are the new m, v and w, written
    # into the slots and the variable. Storing the update (the negative
    # control, `_recompute_update=False`) makes it a temporary, which
    # XLA:CPU allocates on every step (2.8x slower on an AMD EPYC).
    opt = keras_lamb.LAMB(learning_rate=0.01, weight_decay=0.01)
    opt._recompute_update = recompute
    temporaries = full_size_temporaries(opt, (300, 256))
    if recompute is None:
        assert temporaries == []
    else:
        assert len(temporaries) == 1, temporaries


def jitted_step(optimizer, specs):
    """`optimizer`'s step under `jax.jit` (as in `fit` on JAX) on the
    variables of `specs`, compiled: `(compiled, (opt_values, train_values,
    grads))`."""
    import jax

    variables = make_variables(specs)
    optimizer.build(variables)

    def step(opt_values, train_values, grads):
        return optimizer.stateless_apply(opt_values, grads, train_values)

    args = ([v.value for v in optimizer.variables],
            [v.value for v in variables], make_gradients(specs, 0))
    return jax.jit(step).lower(*args).compile(), args


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's XLA:CPU compilation")
@pytest.mark.parametrize("stored", [False, True])
def test_jitted_lamb_step_stores_no_update(stored):
    # Inside jax.jit on a CPU, LAMB recomputes its update for the norm and
    # forms both sums of squares in one multi-output reduction: the step's
    # only temporaries are the partial sums, one per 16 values of each.
    # Storing the update and reducing each norm with `sum` (the negative
    # control, the JAX default before) makes the update a temporary of the
    # variable's size, which XLA:CPU allocates and the system pages in on
    # every step.
    opt = keras_lamb.LAMB(learning_rate=0.01, weight_decay=0.01)
    if stored:
        opt._recompute_update = False
        opt._joint_norms = False
        opt._norm_method = "reduce"
    # Two variables: XLA fuses the one update of a lone variable into both
    # of its consumers.
    compiled, _ = jitted_step(opt, [("dense/kernel", (300, 256), 0.1, 0.01),
                                    ("output/kernel", (256, 300), 0.1, 0.01)])
    temporary = compiled.memory_analysis().temp_size_in_bytes
    variable_bytes = 4 * 300 * 256
    if stored:
        assert temporary >= variable_bytes
    else:
        assert temporary <= 2 * variable_bytes // 8


@pytest.mark.skipif(BACKEND != "jax", reason="the step under jax.jit")
@pytest.mark.parametrize("name, config", [
    ("lamb", "paper"), ("lamb", "bounds_no_bias_correction"),
    ("lars", "mlperf"),
])
def test_jitted_step_equals_reference(name, config):
    # The comparisons above run eagerly; under jit LAMB takes its compiled
    # defaults (the update recomputed, the multi-output norms).
    specs = FIXED_SPECS + random_specs(SPEC_SEEDS[name])
    results = []
    for path in ("reference", "whole"):
        opt = make_optimizer(name, CONFIGS[name][config], path)
        compiled, (opt_values, train_values, grads) = jitted_step(opt, specs)
        new_train, new_opt = compiled(opt_values, train_values, grads)
        results.append([np.array(x) for x in new_train + new_opt])
    for fast, reference in zip(*results):
        np.testing.assert_allclose(fast, reference, **TOLERANCES["float32"])


def in_and_out_of_order(optimizer_factory, specs):
    """The jitted step of two optimizers made by `optimizer_factory`, one
    stepping the variables in order, one in XLA's: `[(compiled, outputs)]`."""
    results = []
    for in_order in (True, False):
        opt = optimizer_factory()
        opt._step_in_order = in_order
        compiled, (opt_values, train_values, grads) = jitted_step(opt, specs)
        new_train, new_opt = compiled(opt_values, train_values, grads)
        results.append((compiled, [np.array(x) for x in new_train + new_opt]))
    return results


@pytest.mark.skipif(BACKEND != "jax", reason="the step under jax.jit")
@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_step_in_order_is_the_same_step(name):
    # `_step_in_order` (off: see `LayerwiseAdaptiveOptimizer`) makes every
    # kernel of a variable wait for the previous variable's new weights. The
    # values are the same bits; the compiled program keeps a wait for every
    # variable after the first (a `select` on a never-true predicate formed
    # from the bits of the previous weights, copied into each kernel that
    # reads the gradient), which XLA did not fold away. In XLA's order (the
    # default, and the control), there is none.
    specs = FIXED_SPECS + random_specs(SPEC_SEEDS[name])
    config = CONFIGS[name]["paper" if name == "lamb" else "mlperf"]
    (ordered, a), (unordered, b) = in_and_out_of_order(
        lambda: make_optimizer(name, config, "whole"), specs)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    waits = [c.as_text().count(" bitcast-convert(") for c in
             (ordered, unordered)]
    assert waits[0] >= len(specs) - 1
    assert waits[1] == 0


@pytest.mark.skipif(BACKEND != "jax", reason="keras_lamb.jax_cpu is JAX's")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_after_returns_its_input_bit_for_bit(dtype):
    import jax
    import jax.numpy as jnp

    from keras_lamb import jax_cpu

    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 7)), dtype)
    x = x.at[0, 0].set(jnp.nan).at[0, 1].set(-jnp.inf).at[0, 2].set(-0.0)
    # Every kind of first element of `previous`: the predicate is false for
    # all of them (it compares masked exponent bits with a value outside
    # the mask).
    for first in [0.0, -0.0, 1.0, -3.5, np.inf, -np.inf, np.nan, 6e-8,
                  6e4]:
        for prev_dtype in ["float32", dtype]:
            previous = jnp.full((2, 3), first, prev_dtype)
            for fn in (jax_cpu.after, jax.jit(jax_cpu.after)):
                y = fn(x, previous)
                assert y.dtype == x.dtype
                np.testing.assert_array_equal(bits(y), bits(x))
    # A scalar `previous` works; an empty one adds no dependency.
    np.testing.assert_array_equal(
        bits(jax_cpu.after(x, jnp.float32(2.0))), bits(x))
    assert jax_cpu.after(x, jnp.zeros((0, 4), dtype)) is x
    # The comparison detects a change of one bit (a negative control).
    assert not np.array_equal(bits(x.at[3, 3].add(1)), bits(x))


def bits(x):
    """The bit patterns of a float array (NaNs and signed zeros kept)."""
    x = np.asarray(x)
    return x.view(f"uint{8 * x.dtype.itemsize}")
