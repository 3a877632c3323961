"""Peak compute and memory bandwidth of common accelerators, by `device_kind`.

Used for MFU in training metrics and for the bandwidth floor in benchmarks; a
command-line value overrides.
"""

from __future__ import annotations

# (substring of the lower-cased `device_kind`, dense bf16 peak FLOP/s, memory
# bandwidth in bytes/s), vendor data sheets, no sparsity. The longest matching
# substring wins, so 'h100 pcie' beats 'h100' and 'tpu v5 lite' beats 'tpu v5'.
DEVICE_SPECS: tuple[tuple[str, float, float], ...] = (
    ("h100", 989e12, 3.35e12),  # H100 SXM5 80GB HBM3 ('NVIDIA H100 80GB HBM3')
    ("h100 pcie", 756e12, 2.0e12),
    ("h100 nvl", 835e12, 3.9e12),
    ("h200", 989e12, 4.8e12),  # H200 SXM 141GB HBM3e
    ("gh200", 989e12, 4.0e12),  # GH200 96GB HBM3
    ("a100", 312e12, 2.039e12),  # A100 SXM4 80GB
    ("a100-sxm4-40gb", 312e12, 1.555e12),
    ("a100-pcie-40gb", 312e12, 1.555e12),
    ("a100 80gb pcie", 312e12, 1.935e12),
    ("tpu v4", 275e12, 1.228e12),
    ("tpu v5 lite", 197e12, 8.19e11),  # v5e
    ("tpu v5e", 197e12, 8.19e11),
    ("tpu v5", 459e12, 2.765e12),  # v5p
    ("tpu v5p", 459e12, 2.765e12),
    ("tpu v6 lite", 918e12, 1.64e12),  # v6e (Trillium)
    ("tpu v6e", 918e12, 1.64e12),
)


def device_spec(device_kind: str) -> tuple[float | None, float | None]:
    """(peak bf16 FLOP/s, memory bytes/s) of one device by its `device_kind`; Nones if unknown."""
    kind = device_kind.lower()
    for key, peak, bandwidth in sorted(DEVICE_SPECS, key=lambda s: len(s[0]), reverse=True):
        if key in kind:
            return peak, bandwidth
    return None, None
