"""Device profiles: public specs of the phones, boards and GPUs edgepack targets, for ``edgepack bench --profile``.

A profile sets the host benchmark's thread count and device, the memory budget its peak memory is checked
against, and the memory bandwidth behind the bandwidth-bound decode estimate. Bandwidths are theoretical peaks
from the memory interface (sustained is lower), so estimates made from them are upper bounds.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass

from edgepack.errors import EdgepackError


@dataclass(frozen=True)
class DeviceProfile:
    """One device: what one app can use of it, and how fast its memory is."""

    name: str
    memory_bandwidth_gbs: float  # theoretical peak, GB/s (1e9 bytes/s)
    app_memory_mib: int  # RAM (or GPU memory) one app can hold before the OS kills it or allocation fails
    threads: int  # intra-op threads to use: the big cores, leaving the rest to the OS and UI
    device: str  # runner --device: "cpu" or "cuda"
    unified_memory: bool  # CPU and GPU share the RAM, so process RSS and GPU memory both count
    source: str  # where the numbers come from

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, DeviceProfile] = {
    profile.name: profile
    for profile in (
        DeviceProfile(
            name="pixel-8",
            memory_bandwidth_gbs=68.3,
            # 8 GB phone. Android sets no native-heap cap, but lmkd kills the foreground app under memory pressure;
            # with the system, SystemUI and cached apps resident, ~3.5 GB is what a native app holds reliably.
            app_memory_mib=3584,
            threads=4,  # Cortex-X3 + 3 of the 4 Cortex-A715; the A510s are too slow to help a matmul
            device="cpu",
            unified_memory=True,
            source="Google Tensor G3: 1x X3, 4x A715, 4x A510; 8 GB LPDDR5X, 64-bit bus at 8533 MT/s",
        ),
        DeviceProfile(
            name="galaxy-s24",
            memory_bandwidth_gbs=76.8,
            # 8 GB phone, same Android low-memory-killer reasoning as pixel-8.
            app_memory_mib=3584,
            threads=4,  # Cortex-X4 + the three 3.15 GHz Cortex-A720
            device="cpu",
            unified_memory=True,
            source="Snapdragon 8 Gen 3 for Galaxy: 1x X4, 5x A720, 2x A520; 8 GB LPDDR5X, 64-bit bus at 9600 MT/s",
        ),
        DeviceProfile(
            name="iphone-15",
            memory_bandwidth_gbs=51.2,
            # 6 GB phone. iOS jetsam kills an app near ~3 GB on 6 GB devices unless it has the
            # com.apple.developer.kernel.increased-memory-limit entitlement; os_proc_available_memory() tells.
            app_memory_mib=2867,
            threads=2,  # the two Everest performance cores
            device="cpu",
            unified_memory=True,
            source="Apple A16 Bionic: 2 performance + 4 efficiency cores; 6 GB LPDDR5, 64-bit bus at 6400 MT/s",
        ),
        DeviceProfile(
            name="raspberry-pi-5",
            memory_bandwidth_gbs=17.1,
            # 8 GB model. Plain Linux, no per-app cap: leave ~2 GB for the OS and the page cache of the model file.
            app_memory_mib=6144,
            threads=4,
            device="cpu",
            unified_memory=True,
            source="Broadcom BCM2712: 4x Cortex-A76 at 2.4 GHz; 8 GB LPDDR4X-4267, 32-bit bus",
        ),
        DeviceProfile(
            name="jetson-orin-nano",
            memory_bandwidth_gbs=68.0,
            # 8 GB shared by CPU and GPU; JetPack's Ubuntu, the CUDA context and cuDNN take ~2.5 GB.
            app_memory_mib=5632,
            threads=6,
            device="cuda",
            unified_memory=True,
            source="Jetson Orin Nano 8GB: 6x Cortex-A78AE, 1024-core Ampere GPU; 8 GB LPDDR5, 128-bit, 68 GB/s "
            "(102 GB/s in the 'Super' MAXN mode)",
        ),
        DeviceProfile(
            name="server-h100",
            memory_bandwidth_gbs=3350.0,
            # 80 GB HBM3, of which ~78 GiB is visible to CUDA; keep ~2 GiB for the CUDA context and workspaces.
            app_memory_mib=77824,
            threads=8,  # host threads only drive the graph; the GPU does the math
            device="cuda",
            unified_memory=False,
            source="NVIDIA H100 SXM5 80GB: HBM3 at 3.35 TB/s",
        ),
    )
}


def get_profile(name: str) -> DeviceProfile:
    """The profile called ``name``; a typo raises one line listing the valid names."""
    if name in PROFILES:
        return PROFILES[name]
    close = difflib.get_close_matches(name, list(PROFILES), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise EdgepackError(f"unknown device profile {name!r}: {hint}valid profiles are {', '.join(PROFILES)}")
