"""The names of an ONNX export folder's format (manifest.json and its graphs), light for the command line's --help:
engine/exported.py reads such a folder, export/onnx.py writes one."""

FORMAT = "ipadapter-instruct-onnx/1"
GRAPHS = ("text_encoder", "image_encoder", "projector", "unet", "vae_decoder")
SDXL_GRAPHS = GRAPHS + ("text_encoder_2",)  # an SDXL export's (manifest kind "sdxl")
EDIT_GRAPHS = GRAPHS + ("vae_encoder",)  # an InstructPix2Pix export's
SOURCES = {"model": "--model", "image_encoder": "--image-encoder", "adapter": "--adapter"}  # -> the override flag
DEFAULT_OPSET = 17
