"""Physical constants and unit factors the pipeline shares, each defined once with its source."""

# Lu-177 physical half-life 6.647 d (ICRP Publication 107, 2008).
LU177_HALF_LIFE_D = 6.647
LU177_HALF_LIFE_H = LU177_HALF_LIFE_D * 24.0
LU177_HALF_LIFE_S = LU177_HALF_LIFE_D * 86400.0

# ICRU soft tissue, the medium of the paper's kernels (Li et al., Med Phys 49 (2022) 1216, sec. 2.2).
KERNEL_MEDIUM_DENSITY_G_CM3 = 1.04
# Below this mass density the paper sets the dose rate to zero (Li et al. 2022, sec. 2.2): air
# and the gas in bowel and lungs' edges, where 1.04/density scaling would explode.
LOW_DENSITY_CUTOFF_G_CM3 = 0.1

# Gy/s -> mGy/h: 1e3 mGy/Gy x 3600 s/h.
MGY_PER_H_PER_GY_PER_S = 3.6e6
