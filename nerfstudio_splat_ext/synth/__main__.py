from nerfstudio_splat_ext.synth.cli import entrypoint

entrypoint()
