"""splat-ext's full-image datamanager (datamanagers/image_datamanager.py): the same batches as nerfstudio's."""

from __future__ import annotations

import torch


def test_training_batches_are_the_cached_images_and_their_cameras(tiny_synth):
    from nerfstudio_splat_ext.dataparsers.splat_ext_dataparser import SplatExtDataParserConfig
    from nerfstudio_splat_ext.datamanagers.image_datamanager import SplatExtImageDataManagerConfig

    config = SplatExtImageDataManagerConfig(dataparser=SplatExtDataParserConfig(data=tiny_synth),
                                            cache_images_type="uint8")  # "gpu" caching on the given device
    datamanager = config.setup(device="cpu", test_mode="val")
    n = len(datamanager.train_dataset)
    seen = set()
    for step in range(2 * n):
        camera, batch = datamanager.next_train(step)
        index = camera.metadata["cam_idx"]
        seen.add(index)
        expected = datamanager.train_cameras[index : index + 1]
        for name in ("camera_to_worlds", "fx", "fy", "cx", "cy", "width", "height"):
            assert torch.equal(getattr(camera, name), getattr(expected, name)), name
        assert torch.equal(batch["image"], datamanager.cached_train[index]["image"])
        assert batch["image"].shape[:2] == (int(camera.height), int(camera.width))
        camera.rescale_output_resolution(0.5)  # what a model may do to the camera it was given
    assert seen == set(range(n))  # every image once per epoch, as nerfstudio's sampler does
    again = datamanager._train_camera(0)
    assert int(again.width) == int(datamanager.train_cameras.width[0])
