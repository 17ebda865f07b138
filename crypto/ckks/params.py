"""CKKS parameter presets, their security basis, and the aggregation preflight.

Security basis
--------------
Every preset stays within the 128-bit classical security bound of the
Homomorphic Encryption Standard (homomorphicencryption.org, 2018), for a
ternary secret and error standard deviation 3.2. The bound caps the bit size
of the whole coefficient modulus q, special prime included, for each
polynomial degree N: 27 bits for N=1024, 54 for 2048, 109 for 4096, 218 for
8192, 438 for 16384 and 881 for 32768. These are the values of SEAL's
``CoeffModulus.MaxBitCount(N, SEC_LEVEL_TYPE.TC128)`` in TenSEAL 0.3.18, and
SEAL enforces them when a context is built with ``SEC_LEVEL_TYPE.TC128``.

Presets
-------
``compact``
    SEAL CKKS through ``tenseal.sealapi``: N=4096, one 42-bit prime, no special
    prime, scale 2^39. The server only adds ciphertexts, so no key switching
    is needed, and the public material is the parameters alone (no public,
    relinearization or Galois keys). Two reals share each complex slot, so one
    ciphertext carries N=4096 values. Uploads are seeded symmetric ciphertexts:
    the second polynomial is regenerated from a 64-byte seed, which halves the
    upload. It uses 42 of the 109 bits allowed at N=4096.

    A 40-bit prime with scale 2^37 uploads about 0.4 byte less per parameter
    (6.05 against 6.43 bytes after SEAL's zstd compression). But after summing
    1000 updates, its error reached 1.3e-5 relative on aggregate entries of
    magnitude 1e-2, above the 1e-5 that `preflight` requires by default. Two
    more bits of modulus and scale cut the error fourfold and keep the same
    headroom q/(2*scale) = 4. That headroom only suits models whose weights
    stay within about 1.4 of their initial values over the run (the clients'
    drift check enforces it); ``compact_wide`` trades 0.8 byte per parameter
    of upload for 128 times the headroom.

``compact_wide`` (default)
    ``compact`` with one 50-bit prime and scale 2^40. The headroom
    q/(2*scale) grows from 4 to 512, so global models whose weights move by
    tens (fraud's default SGD step moves some by more than 3 in one round)
    fit, at 7.3 bytes per parameter up and 14.5 down. It uses 50 of the 109
    bits allowed at N=4096. The larger scale also halves the error.

``tenseal_default``
    The common TenSEAL configuration: ``ts.ckks_vector`` with N=8192,
    coefficient moduli [60, 40, 40, 60] (the last is the special prime) and
    scale 2^40, one vector per 4096 values, public-key encryption. It uses 200
    of the 218 bits allowed at N=8192. At 1M parameters and 10 clients its
    upload is 12.6 times and its round time about 7 times that of ``compact``
    (bench/ckks_bench.py). Its public-key noise has heavier tails, so the
    preflight accepts at most 32 nodes at the default bounds. It serves as a
    reference, and as the choice when the aggregate needs more headroom than
    ``compact_wide`` has.

Preflight
---------
A CKKS sum that outgrows the modulus wraps around silently to a wrong value,
so `preflight` checks the node count, norm bound and weights against the
preset before any round runs. See its docstring for the exact bounds.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from crypto.ckks.errors import PreflightError

__all__ = [
    "DEFAULT_PRESET",
    "HE_STANDARD_MAX_MODULUS_BITS_128",
    "PRESETS",
    "PreflightReport",
    "Preset",
    "SAFETY_MARGIN",
    "TAIL_PROBABILITY",
    "get_preset",
    "preflight",
    "preset_by_wire_id",
    "wider_presets",
]

logger = logging.getLogger(__name__)

# Maximum bit size of the coefficient modulus q for 128-bit classical security,
# by polynomial degree N (Homomorphic Encryption Standard, 2018, as tabulated by
# SEAL's CoeffModulus.MaxBitCount).
HE_STANDARD_MAX_MODULUS_BITS_128: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}

# Decrypted coefficients wrap once they reach q/2. The margin keeps the
# aggregate's coefficients below q/4, which is also the largest magnitude
# SEAL's encoder accepts for a fresh plaintext (it reserves a bit for the sign).
SAFETY_MARGIN = 2.0

# The predicted maximum error is the magnitude that the summed noise of one
# coordinate exceeds with this probability, so a 10-million-parameter
# aggregate exceeds it on about 2 % of rounds. For Gaussian noise it is 6
# standard deviations.
TAIL_PROBABILITY = 2e-9

NOISE_GAUSSIAN = "gaussian"
NOISE_LAPLACE = "laplace"

BACKEND_SEALAPI = "sealapi"
BACKEND_TENSEAL = "tenseal"


@dataclass(frozen=True)
class Preset:
    """CKKS parameters and the encoding choices that go with them.

    Parameters
    ----------
    name : str
        Registry name, such as ``"compact"``.
    wire_id : int
        Number that identifies the preset inside serialized batches and contexts.
    backend : str
        ``"sealapi"`` for raw SEAL objects or ``"tenseal"`` for ``ts.ckks_vector``.
    poly_modulus_degree : int
        Polynomial degree N.
    coeff_mod_bit_sizes : tuple of int
        Bit sizes of the primes of the coefficient modulus, special prime last.
    special_prime : bool
        Whether the last prime is a key-switching prime that ciphertexts never use.
    scale_bits : int
        log2 of the CKKS scale.
    complex_packing : bool
        Whether two reals share each complex slot, so a ciphertext carries N values
        instead of N/2.
    seeded_upload : bool
        Whether uploads are seeded symmetric ciphertexts of half size.
    noise_std : float
        Standard deviation of a fresh ciphertext's decryption error per polynomial
        coefficient, in integer units (the scaled value has the size ``scale``).
    noise_distribution : str
        ``"gaussian"`` or ``"laplace"``: the distribution of the decryption error
        of one value, which sets how far its tail reaches.
    description : str
        One line for logs and the benchmark page.
    """

    name: str
    wire_id: int
    backend: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    special_prime: bool
    scale_bits: int
    complex_packing: bool
    seeded_upload: bool
    noise_std: float
    noise_distribution: str
    description: str

    def __post_init__(self) -> None:
        max_bits = HE_STANDARD_MAX_MODULUS_BITS_128.get(self.poly_modulus_degree)
        if max_bits is None:
            raise ValueError(
                f"Preset {self.name!r}: poly_modulus_degree {self.poly_modulus_degree} "
                f"is not one of {sorted(HE_STANDARD_MAX_MODULUS_BITS_128)}."
            )

        if self.total_modulus_bits > max_bits:
            raise ValueError(
                f"Preset {self.name!r}: coefficient modulus of {self.total_modulus_bits} bits "
                f"exceeds the {max_bits}-bit maximum for 128-bit security at "
                f"N={self.poly_modulus_degree}; use fewer or smaller primes."
            )

        if self.scale_bits >= self.data_modulus_bits:
            raise ValueError(
                f"Preset {self.name!r}: scale 2^{self.scale_bits} leaves no headroom below the "
                f"{self.data_modulus_bits}-bit data modulus; use a smaller scale_bits."
            )

        if self.noise_distribution not in (NOISE_GAUSSIAN, NOISE_LAPLACE):
            raise ValueError(
                f"Preset {self.name!r}: noise_distribution {self.noise_distribution!r} is not "
                f"{NOISE_GAUSSIAN!r} or {NOISE_LAPLACE!r}."
            )

        if self.backend not in (BACKEND_SEALAPI, BACKEND_TENSEAL):
            raise ValueError(
                f"Preset {self.name!r}: backend {self.backend!r} is not "
                f"{BACKEND_SEALAPI!r} or {BACKEND_TENSEAL!r}."
            )

    @property
    def scale(self) -> float:
        """CKKS scale, 2**scale_bits."""
        return 2.0**self.scale_bits

    @property
    def values_per_chunk(self) -> int:
        """Number of reals one ciphertext carries."""
        slots = self.poly_modulus_degree // 2
        return 2 * slots if self.complex_packing else slots

    @property
    def total_modulus_bits(self) -> int:
        """Bit size of the whole coefficient modulus, special prime included."""
        return sum(self.coeff_mod_bit_sizes)

    @property
    def data_modulus_bits(self) -> int:
        """Bit size of the modulus that fresh ciphertexts use."""
        return sum(self.data_mod_bit_sizes)

    @property
    def data_mod_bit_sizes(self) -> tuple[int, ...]:
        """Bit sizes of the primes that fresh ciphertexts use."""
        if self.special_prime:
            return self.coeff_mod_bit_sizes[:-1]
        return self.coeff_mod_bit_sizes

    @property
    def max_modulus_bits_128(self) -> int:
        """Largest modulus size, in bits, that keeps 128-bit security at this N."""
        return HE_STANDARD_MAX_MODULUS_BITS_128[self.poly_modulus_degree]

    @property
    def packing_factor(self) -> float:
        """Ratio of the largest polynomial coefficient to the largest value, at worst.

        A coefficient of a CKKS plaintext is at most the mean modulus of the
        slot values times the scale. A complex slot holding two reals bounded
        by B has modulus up to sqrt(2) * B.
        """
        return math.sqrt(2.0) if self.complex_packing else 1.0

    def data_modulus(self) -> int:
        """Return the exact modulus q that fresh ciphertexts and sums live under."""
        primes = _seal_primes(self.poly_modulus_degree, self.coeff_mod_bit_sizes)
        data_primes = primes[: len(self.data_mod_bit_sizes)]
        return math.prod(data_primes)

    def headroom(self) -> float:
        """Return q / (2 * scale), the magnitude at which decrypted values wrap."""
        return self.data_modulus() / (2.0 * self.scale)

    @property
    def tail_sigmas(self) -> float:
        """Standard deviations of noise that one value exceeds with TAIL_PROBABILITY."""
        if self.noise_distribution == NOISE_LAPLACE:
            # P(|X| > t) = exp(-t * sqrt(2) / std) for a Laplace variable.
            return math.log(1.0 / TAIL_PROBABILITY) / math.sqrt(2.0)
        return 6.0

    def noise_std_per_value(self) -> float:
        """Return the standard deviation of one fresh ciphertext's error per real value.

        An error of standard deviation sigma on each of the N coefficients
        becomes a complex slot error of variance N * sigma^2 / scale^2, half
        of it on the real part and half on the imaginary part.
        """
        return self.noise_std * math.sqrt(self.poly_modulus_degree / 2) / self.scale


@functools.lru_cache(maxsize=16)
def _seal_primes(poly_modulus_degree: int, bit_sizes: tuple[int, ...]) -> tuple[int, ...]:
    """Return the primes SEAL picks for these bit sizes (deterministic for N and sizes)."""
    import tenseal.sealapi as sealapi

    moduli = sealapi.CoeffModulus.Create(poly_modulus_degree, list(bit_sizes))
    return tuple(modulus.value() for modulus in moduli)


PRESETS: dict[str, Preset] = {
    "compact": Preset(
        name="compact",
        wire_id=1,
        backend=BACKEND_SEALAPI,
        poly_modulus_degree=4096,
        coeff_mod_bit_sizes=(42,),
        special_prime=False,
        scale_bits=39,
        complex_packing=True,
        seeded_upload=True,
        # SEAL's default error sampler is a centred binomial distribution over
        # 21 bit pairs (variance 21/2, its nominal standard deviation 3.2). The
        # encoder adds a uniform rounding error of variance 1/12. Measured: 3.25.
        noise_std=math.sqrt(21.0 / 2.0 + 1.0 / 12.0),
        noise_distribution=NOISE_GAUSSIAN,
        description="SEAL CKKS, N=4096, one 42-bit prime, scale 2^39, complex packing, "
        "seeded symmetric upload",
    ),
    "compact_wide": Preset(
        name="compact_wide",
        wire_id=3,
        backend=BACKEND_SEALAPI,
        poly_modulus_degree=4096,
        coeff_mod_bit_sizes=(50,),
        special_prime=False,
        scale_bits=40,
        complex_packing=True,
        seeded_upload=True,
        # Same sampler and encoder as compact.
        noise_std=math.sqrt(21.0 / 2.0 + 1.0 / 12.0),
        noise_distribution=NOISE_GAUSSIAN,
        description="SEAL CKKS, N=4096, one 50-bit prime, scale 2^40, complex packing, "
        "seeded symmetric upload",
    ),
    "tenseal_default": Preset(
        name="tenseal_default",
        wire_id=2,
        backend=BACKEND_TENSEAL,
        poly_modulus_degree=8192,
        coeff_mod_bit_sizes=(60, 40, 40, 60),
        special_prime=True,
        scale_bits=40,
        complex_packing=False,
        seeded_upload=False,
        # SEAL encrypts with the public key under the special prime and then
        # divides by it. The error left is the rounding of that division,
        # r0 + r1 * s, with r uniform in [-1/2, 1/2] and a ternary secret s that
        # is nonzero with probability 2/3. Its variance is (1 + 2N/3) / 12, so
        # the standard deviation is 21.3 at N=8192. Measured: 21.2.
        noise_std=math.sqrt((1.0 + 2.0 * 8192 / 3.0) / 12.0),
        # Each slot's error is scaled by the secret key's value in that slot,
        # which varies from slot to slot, so one value's error is a Gaussian
        # with random variance: Laplace, kurtosis 6 (measured 5.9 and 6.0).
        noise_distribution=NOISE_LAPLACE,
        description="TenSEAL ckks_vector, N=8192, moduli [60, 40, 40, 60], scale 2^40, "
        "public-key encryption",
    ),
}

DEFAULT_PRESET = "compact_wide"


def get_preset(preset: str | Preset) -> Preset:
    """Look up a preset by name, or return a `Preset` instance unchanged.

    Raises
    ------
    ValueError
        If the name is not registered. The message lists the registered names.
    """
    if isinstance(preset, Preset):
        return preset

    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(
            f"Unknown CKKS preset {preset!r}; choose one of {sorted(PRESETS)}."
        ) from None


def preset_by_wire_id(wire_id: int) -> Preset | None:
    """Return the registered preset with this wire id, or None if there is none."""
    for preset in PRESETS.values():
        if preset.wire_id == wire_id:
            return preset
    return None


@dataclass(frozen=True)
class PreflightReport:
    """Bounds that `preflight` computed for one configuration, for logging.

    Attributes
    ----------
    preset : str
        Preset name.
    num_nodes : int
        Number of updates summed per round.
    weight_sum : float
        Sum of the node weights.
    norm_bound : float
        L2 norm bound C of each update; it also bounds every coordinate.
    aggregate_bound : float
        weight_sum * norm_bound, the largest possible aggregate coordinate.
    required_headroom : float
        aggregate_bound * packing factor * SAFETY_MARGIN.
    headroom : float
        q / (2 * scale) of the preset.
    predicted_max_error : float
        Magnitude that the summed noise of one coordinate exceeds with
        probability TAIL_PROBABILITY.
    predicted_relative_error : float
        predicted_max_error divided by aggregate_bound / dynamic_range.
    max_relative_error : float
        Largest relative error accepted.
    dynamic_range : float
        Ratio of aggregate_bound to the smallest coordinate that must meet
        max_relative_error.
    """

    preset: str
    num_nodes: int
    weight_sum: float
    norm_bound: float
    aggregate_bound: float
    required_headroom: float
    headroom: float
    predicted_max_error: float
    predicted_relative_error: float
    max_relative_error: float
    dynamic_range: float


def preflight(
    preset: str | Preset,
    num_nodes: int,
    norm_bound: float,
    weights: Sequence[float] | None = None,
    *,
    max_relative_error: float = 1e-5,
    dynamic_range: float = 100.0,
) -> PreflightReport:
    """Check that an encrypted sum of `num_nodes` weighted updates cannot wrap.

    Each node encrypts ``w_i * u_i`` with ``||u_i||_2 <= norm_bound``, so every
    coordinate of the aggregate is at most ``B = sum(w_i) * norm_bound`` in
    magnitude. Two conditions must hold:

    1. No wrap-around: ``B * packing_factor * SAFETY_MARGIN <= q / (2 * scale)``.
    2. Precision: the predicted maximum error is at most
       ``max_relative_error`` times ``B / dynamic_range``. It is the magnitude
       that the noise of `num_nodes` summed fresh ciphertexts exceeds with
       probability ``TAIL_PROBABILITY`` per coordinate. With the default
       dynamic range of 100, aggregate coordinates down to 1 % of the largest
       possible one keep the requested relative precision.

    Parameters
    ----------
    preset : str or Preset
        Preset name or instance.
    num_nodes : int
        Number of updates summed into one aggregate, at least 1.
    norm_bound : float
        L2 norm bound of each node's update before weighting, greater than 0.
    weights : sequence of float, optional
        One non-negative weight per node. Default: ``1 / num_nodes`` each.
    max_relative_error : float, default 1e-5
        Largest accepted predicted relative error.
    dynamic_range : float, default 100.0
        Ratio between the largest possible aggregate coordinate and the
        smallest one that must meet `max_relative_error`, at least 1.

    Returns
    -------
    PreflightReport
        The computed bounds, for logging.

    Raises
    ------
    PreflightError
        If the sum could wrap or the predicted precision is too low. The
        reason names the failing bound, the values and the fix.
    ValueError
        If an argument is out of range.
    """
    preset = get_preset(preset)
    weight_list = _check_preflight_arguments(
        num_nodes, norm_bound, weights, max_relative_error, dynamic_range
    )

    weight_sum = math.fsum(weight_list)
    aggregate_bound = weight_sum * norm_bound
    required_headroom = aggregate_bound * preset.packing_factor * SAFETY_MARGIN
    headroom = preset.headroom()
    noise_std = preset.noise_std_per_value() * math.sqrt(num_nodes)
    predicted_max_error = preset.tail_sigmas * noise_std
    predicted_relative_error = predicted_max_error / (aggregate_bound / dynamic_range)

    report = PreflightReport(
        preset=preset.name,
        num_nodes=num_nodes,
        weight_sum=weight_sum,
        norm_bound=norm_bound,
        aggregate_bound=aggregate_bound,
        required_headroom=required_headroom,
        headroom=headroom,
        predicted_max_error=predicted_max_error,
        predicted_relative_error=predicted_relative_error,
        max_relative_error=max_relative_error,
        dynamic_range=dynamic_range,
    )

    if required_headroom > headroom:
        raise PreflightError(_wrap_reason(preset, report))

    if predicted_relative_error > max_relative_error:
        raise PreflightError(_precision_reason(preset, report))

    logger.info(
        "preflight: preset %s accepts %d nodes, aggregate bound %.3g of headroom %.3g, "
        "predicted relative error %.2g",
        preset.name,
        num_nodes,
        aggregate_bound,
        headroom,
        predicted_relative_error,
    )
    return report


def _check_preflight_arguments(
    num_nodes: int,
    norm_bound: float,
    weights: Sequence[float] | None,
    max_relative_error: float,
    dynamic_range: float,
) -> list[float]:
    """Validate the preflight arguments and return the weights as a list."""
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"num_nodes must be an integer >= 1, got {num_nodes!r}.")

    if not (math.isfinite(norm_bound) and norm_bound > 0):
        raise ValueError(f"norm_bound must be finite and > 0, got {norm_bound!r}.")

    if not (math.isfinite(max_relative_error) and max_relative_error > 0):
        raise ValueError(
            f"max_relative_error must be finite and > 0, got {max_relative_error!r}."
        )

    if not (math.isfinite(dynamic_range) and dynamic_range >= 1):
        raise ValueError(f"dynamic_range must be finite and >= 1, got {dynamic_range!r}.")

    if weights is None:
        return [1.0 / num_nodes] * num_nodes

    weight_list = [float(weight) for weight in weights]
    if len(weight_list) != num_nodes:
        raise ValueError(
            f"weights has {len(weight_list)} entries but num_nodes is {num_nodes}; "
            "pass one weight per node."
        )

    for index, weight in enumerate(weight_list):
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weights[{index}] must be finite and >= 0, got {weight!r}.")

    if math.fsum(weight_list) <= 0:
        raise ValueError("weights sum to 0; at least one node needs a positive weight.")

    return weight_list


def _wrap_reason(preset: Preset, report: PreflightReport) -> str:
    """Build the error text for a configuration whose sum could wrap around."""
    divisor = preset.packing_factor * SAFETY_MARGIN
    max_aggregate_bound = report.headroom / divisor
    return (
        f"Preflight failed: the encrypted sum could wrap around. Aggregate bound "
        f"sum(weights) * norm_bound = {report.weight_sum:.6g} * {report.norm_bound:.6g} "
        f"= {report.aggregate_bound:.6g}; times packing factor {preset.packing_factor:.4g} "
        f"and safety margin {SAFETY_MARGIN:g} it needs {report.required_headroom:.6g}, "
        f"but preset {preset.name!r} has headroom q/(2*scale) = {report.headroom:.6g}. "
        f"Keep sum(weights) * norm_bound <= {max_aggregate_bound:.6g}: lower norm_bound "
        f"to <= {max_aggregate_bound / report.weight_sum:.6g}, renormalise the weights "
        f"to sum to <= {max_aggregate_bound / report.norm_bound:.6g} (or use fewer nodes), "
        f"or choose a preset with more headroom: {_describe(wider_presets(preset))}."
    )


def wider_presets(preset: Preset) -> list[Preset]:
    """Return the registered presets whose headroom exceeds ``preset``'s, smallest headroom first."""
    wider = (other for other in PRESETS.values() if other.headroom() > preset.headroom())
    return sorted(wider, key=Preset.headroom)


def _describe(presets: list[Preset]) -> str:
    """Name each preset with its headroom, for error messages."""
    if not presets:
        return "none is registered"
    return ", ".join(f"{other.name!r} (headroom {other.headroom():.4g})" for other in presets)


def _precision_reason(preset: Preset, report: PreflightReport) -> str:
    """Build the error text for a configuration whose error would be too large."""
    reference = report.aggregate_bound / report.dynamic_range
    noise_one_node = preset.tail_sigmas * preset.noise_std_per_value()
    max_nodes = math.floor((report.max_relative_error * reference / noise_one_node) ** 2)
    max_aggregate_bound = report.headroom / (preset.packing_factor * SAFETY_MARGIN)
    return (
        f"Preflight failed: predicted precision is too low. With {report.num_nodes} nodes, "
        f"preset {preset.name!r} (scale 2^{preset.scale_bits}) predicts a maximum error of "
        f"{report.predicted_max_error:.3g}, which is {report.predicted_relative_error:.3g} "
        f"relative to coordinates of magnitude aggregate_bound / dynamic_range = "
        f"{report.aggregate_bound:.6g} / {report.dynamic_range:g} = {reference:.3g}; the "
        f"maximum is {report.max_relative_error:g}. Sum at most {max_nodes} nodes per "
        f"aggregate, or multiply all weights by a common factor (and divide the decrypted "
        f"sum by it) so that sum(weights) * norm_bound comes closer to "
        f"{max_aggregate_bound:.6g}, the largest value the headroom allows."
    )
