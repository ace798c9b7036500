"""From network maps to nuclei and back to numbers: HoVer-Net post-processing and the PQ metric family."""
