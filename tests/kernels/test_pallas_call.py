"""The poisoning the kernel tests rely on: an element a kernel forgets to write must come back NaN."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from orchestra_jax.kernels import pallas_call


def test_poisoned_outputs_expose_unwritten_elements():
    written = int(np.random.default_rng().integers(1, 8))

    def kernel(x_ref, o_ref):
        o_ref[:written] = x_ref[:written] * 2.0

    spec = pl.BlockSpec((8,), lambda i: (0,))
    (out,) = pallas_call.call(
        kernel,
        grid=(1,),
        in_specs=(spec,),
        out_specs=(spec,),
        out_shape=(jax.ShapeDtypeStruct((8,), jnp.float32),),
        args=(jnp.arange(8.0),),
        interpret=True,
        poison=True,
    )
    out = np.asarray(out)
    np.testing.assert_array_equal(out[:written], 2.0 * np.arange(written))
    assert np.all(np.isnan(out[written:]))
