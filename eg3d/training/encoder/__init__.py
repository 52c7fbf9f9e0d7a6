"""Camera-aware W+ encoder for EG3D (3DpSp: pSp with ReStyle refinement). See docs/encoder.md."""

from training.encoder.networks import EncoderConfig, W3DEncoder
from training.encoder.restyle import Iteration, encode, image_error, refine, refine_guarded, start_latent
from training.encoder.files import EncoderFileError, load, save
