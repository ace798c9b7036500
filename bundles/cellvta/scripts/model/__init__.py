"""The network: timm encoders, the deformable-attention adapter, the HoVer-Net decoder, weight conversion and export."""
