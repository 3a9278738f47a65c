"""diffusers' own tests of its EMAModel (``tests/others/test_ema.py`` of huggingface/diffusers:
``EMAModelTests`` and ``EMAModelTestsForeach``), run against offload_ema's drop-in.

Ported as they are, with these adaptations (each marked ``ADAPTED`` where it is made):

- No network here: instead of ``UNet2DConditionModel.from_pretrained(
  "hf-internal-testing/tiny-stable-diffusion-pipe", subfolder="unet")`` the UNet is built from that
  checkpoint's config (the same tiny architecture: blocks of 32 and 64 channels, cross-attention
  dim 32, 4 latent channels), seeded, with random weights.
- ``enable_full_determinism()`` is diffusers' module-level call; here it is a fixture that restores
  the previous setting afterwards, so the tests that run after this file are not changed by it.
- ``test_zero_decay``: diffusers' ``shadow_params`` is the EMA's own list, updated in place by
  ``step``, so the test's ``step_one_shadow_params`` and ``step_two_shadow_params`` are the same
  tensors there. The drop-in's ``shadow_params`` is a snapshot per read (documented: the average
  lives in host memory, updated by a worker thread); the test reads the list again after the
  second step for both names, which is what diffusers compares.
- Each EMAModel is closed at the end of its test (its worker thread stops; diffusers' class has
  no thread).
- Form only: the two classes' identical bodies are one base class (``foreach`` its only
  difference, as in diffusers' two copies); ``@skip_mps`` is dropped (these run on the CPU).
"""
import tempfile
import unittest

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402

from offload_ema.integrations.diffusers import EMAModel  # noqa: E402

torch_device = "cpu"  # ADAPTED: diffusers' testing_utils.torch_device; these tests are CPU ones

# ADAPTED: the config of hf-internal-testing/tiny-stable-diffusion-pipe's unet, built locally.
TINY_UNET_CONFIG = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
    attention_head_dim=8, norm_num_groups=32)


@pytest.fixture(autouse=True, scope="module")
def _full_determinism():
    """ADAPTED: diffusers' ``enable_full_determinism()`` at import, undone after this module."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def _tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET_CONFIG)


class _Base:
    model_id = "hf-internal-testing/tiny-stable-diffusion-pipe"
    batch_size = 1
    prompt_length = 77
    text_encoder_hidden_dim = 32
    num_in_channels = 4
    latent_height = latent_width = 64
    generator = torch.manual_seed(0)
    foreach = False

    def setUp(self):
        self._emas = []

    def tearDown(self):
        for ema in self._emas:  # ADAPTED: stop the worker threads
            ema.close()

    def get_models(self, decay=0.9999):
        unet = _tiny_unet()  # ADAPTED: no hub download (see the module doc)
        unet = unet.to(torch_device)
        ema_unet = EMAModel(unet.parameters(), decay=decay, model_cls=UNet2DConditionModel,
                            model_config=unet.config, foreach=self.foreach)
        self._emas.append(ema_unet)
        return unet, ema_unet

    def get_dummy_inputs(self):
        noisy_latents = torch.randn(
            self.batch_size, self.num_in_channels, self.latent_height, self.latent_width,
            generator=self.generator
        ).to(torch_device)
        timesteps = torch.randint(0, 1000, size=(self.batch_size,), generator=self.generator).to(
            torch_device)
        encoder_hidden_states = torch.randn(
            self.batch_size, self.prompt_length, self.text_encoder_hidden_dim,
            generator=self.generator
        ).to(torch_device)
        return noisy_latents, timesteps, encoder_hidden_states

    def simulate_backprop(self, unet):
        updated_state_dict = {}
        for k, param in unet.state_dict().items():
            updated_param = torch.randn_like(param) + (param * torch.randn_like(param))
            updated_state_dict.update({k: updated_param})
        unet.load_state_dict(updated_state_dict)
        return unet

    def test_optimization_steps_updated(self):
        unet, ema_unet = self.get_models()
        # Take the first (hypothetical) EMA step.
        ema_unet.step(unet.parameters())
        assert ema_unet.optimization_step == 1

        # Take two more.
        for _ in range(2):
            ema_unet.step(unet.parameters())
        assert ema_unet.optimization_step == 3

    def test_shadow_params_not_updated(self):
        unet, ema_unet = self.get_models()
        # Since the `unet` is not being updated (i.e., backprop'd)
        # there won't be any difference between the `params` of `unet`
        # and `ema_unet` even if we call `ema_unet.step(unet.parameters())`.
        ema_unet.step(unet.parameters())
        orig_params = list(unet.parameters())
        for s_param, param in zip(ema_unet.shadow_params, orig_params):
            assert torch.allclose(s_param, param)

        # The above holds true even if we call `ema.step()` multiple times since
        # `unet` params are still not being updated.
        for _ in range(4):
            ema_unet.step(unet.parameters())
        for s_param, param in zip(ema_unet.shadow_params, orig_params):
            assert torch.allclose(s_param, param)

    def test_shadow_params_updated(self):
        unet, ema_unet = self.get_models()
        # Here we simulate the parameter updates for `unet`. Since there might
        # be some parameters which are initialized to zero we take extra care to
        # initialize their values to something non-zero before the multiplication.
        unet_pseudo_updated_step_one = self.simulate_backprop(unet)

        # Take the EMA step.
        ema_unet.step(unet_pseudo_updated_step_one.parameters())

        # Now the EMA'd parameters won't be equal to the original model parameters.
        orig_params = list(unet_pseudo_updated_step_one.parameters())
        for s_param, param in zip(ema_unet.shadow_params, orig_params):
            assert ~torch.allclose(s_param, param)

        # Ensure this is the case when we take multiple EMA steps.
        for _ in range(4):
            ema_unet.step(unet.parameters())
        for s_param, param in zip(ema_unet.shadow_params, orig_params):
            assert ~torch.allclose(s_param, param)

    def test_consecutive_shadow_params_updated(self):
        # If we call EMA step after a backpropagation consecutively for two times,
        # the shadow params from those two steps should be different.
        unet, ema_unet = self.get_models()

        # First backprop + EMA
        unet_step_one = self.simulate_backprop(unet)
        ema_unet.step(unet_step_one.parameters())
        step_one_shadow_params = ema_unet.shadow_params

        # Second backprop + EMA
        unet_step_two = self.simulate_backprop(unet_step_one)
        ema_unet.step(unet_step_two.parameters())
        step_two_shadow_params = ema_unet.shadow_params

        for step_one, step_two in zip(step_one_shadow_params, step_two_shadow_params):
            assert ~torch.allclose(step_one, step_two)

    def test_zero_decay(self):
        # If there's no decay even if there are backprops, EMA steps
        # won't take any effect i.e., the shadow params would remain the
        # same.
        unet, ema_unet = self.get_models(decay=0.0)
        unet_step_one = self.simulate_backprop(unet)
        ema_unet.step(unet_step_one.parameters())
        step_one_shadow_params = ema_unet.shadow_params

        unet_step_two = self.simulate_backprop(unet_step_one)
        ema_unet.step(unet_step_two.parameters())
        step_two_shadow_params = ema_unet.shadow_params
        # ADAPTED: in diffusers both names hold the EMA's own list, updated in place by the
        # second step; the drop-in's read is a snapshot, so read it again for the first name.
        step_one_shadow_params = ema_unet.shadow_params

        for step_one, step_two in zip(step_one_shadow_params, step_two_shadow_params):
            assert torch.allclose(step_one, step_two)

    def test_serialization(self):
        unet, ema_unet = self.get_models()
        noisy_latents, timesteps, encoder_hidden_states = self.get_dummy_inputs()

        with tempfile.TemporaryDirectory() as tmpdir:
            ema_unet.save_pretrained(tmpdir)
            loaded_unet = UNet2DConditionModel.from_pretrained(tmpdir,
                                                               model_cls=UNet2DConditionModel)
            loaded_unet = loaded_unet.to(unet.device)

        # Since no EMA step has been performed the outputs should match.
        output = unet(noisy_latents, timesteps, encoder_hidden_states).sample
        output_loaded = loaded_unet(noisy_latents, timesteps, encoder_hidden_states).sample

        assert torch.allclose(output, output_loaded, atol=1e-4)


class EMAModelTests(_Base, unittest.TestCase):
    pass


class EMAModelTestsForeach(_Base, unittest.TestCase):
    foreach = True
