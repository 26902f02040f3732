"""One registry of the package's SDEs, divergence estimators and samplers, which the
tests parametrise over (as diffrax's tests do over its solvers)."""

import diffrax as dfx

import scoreflow_eqx as sf


SDES = {"vp": sf.VPSDE(), "subvp": sf.SubVPSDE(), "ve": sf.VESDE()}

DIVERGENCES = {
    "exact": sf.ExactTrace(),
    "exact-reverse-chunked": sf.ExactTrace(mode="reverse", chunk_size=1),
    "hutchinson": sf.Hutchinson(),
    "hutchinson-gaussian-reverse": sf.Hutchinson(probe="gaussian", mode="reverse"),
    "hutchinson-3-probes": sf.Hutchinson(num_probes=3),
}
EXACT_DIVERGENCES = {k: v for k, v in DIVERGENCES.items() if isinstance(v, sf.ExactTrace)}
STOCHASTIC_DIVERGENCES = {k: v for k, v in DIVERGENCES.items() if isinstance(v, sf.Hutchinson)}

#: The string shorthands and the objects they stand for.
DIVERGENCE_SHORTHANDS = {"exact": sf.ExactTrace(), "hutchinson": sf.Hutchinson()}

#: Fixed-step samplers use this many steps in the tests.
NUM_STEPS = 200

SAMPLERS = {
    "ode": sf.ProbabilityFlow(),
    "sde": sf.ReverseSDE(num_steps=NUM_STEPS),
    "pc": sf.PredictorCorrector(num_steps=NUM_STEPS),
    # A second-order solver (valid as the noise is additive: Ito = Stratonovich).
    "sde_heun": sf.ReverseSDE(solver=dfx.Heun(), num_steps=NUM_STEPS // 2),
    "pc_em": sf.PredictorCorrector(
        predictor=sf.EulerMaruyamaPredictor(),
        corrector=sf.LangevinCorrector(snr=0.05),
        num_steps=NUM_STEPS,
    ),
}

#: The method shorthands of `sf.sample` and the objects they stand for.
SAMPLER_SHORTHANDS = {
    "ode": sf.ProbabilityFlow(),
    "sde": sf.ReverseSDE(),
    "pc": sf.PredictorCorrector(),
}

#: Adaptive ODE solvers offered for likelihoods (their NFE is counted exactly).
ODE_SOLVERS = {"dopri5": dfx.Dopri5(), "tsit5": dfx.Tsit5(), "dopri8": dfx.Dopri8()}
