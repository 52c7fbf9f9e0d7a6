"""training/encoder/resnet_backbone.py: the ImageNet ResNet-34 backbone and its weights file."""
import pytest
import torch
import torchvision

from encoder_testlib import NUM_WS, W_DIM
from training.encoder import EncoderConfig, W3DEncoder, load, save
from training.encoder.resnet_backbone import BackboneWeightsError, normalize
from training.synthetic_identity import build_tiny_generator


def imagenet_like_checkpoint(path, arch=torchvision.models.resnet34):
    """A torchvision ResNet state dict with non-trivial batch-norm statistics (as a trained checkpoint has)."""
    torch.manual_seed(0)
    net = arch(weights=None)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
    torch.save(net.state_dict(), path)
    return net.eval()


def resnet_encoder():
    return W3DEncoder(EncoderConfig.for_generator(NUM_WS, W_DIM, 64, backbone='resnet34'))


def test_loaded_backbone_starts_as_imagenet_features_of_the_photo(tmp_path):
    """ImageNet's filters read the photo, zeros the reconstruction: every stage equals torchvision's network on the
    normalised photo (without the max-pool), whatever the reconstruction."""
    reference = imagenet_like_checkpoint(tmp_path / 'resnet34.pth')
    encoder = resnet_encoder()
    encoder.load_backbone_weights(str(tmp_path / 'resnet34.pth'))
    torch.manual_seed(1)
    photo, reconstruction = torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        x = encoder.stem(encoder._input(photo, reconstruction))
        y = reference.relu(reference.bn1(reference.conv1(normalize(photo))))
        assert torch.allclose(x, y, atol=1e-5)
        for stage, layer in zip(encoder.stages, (reference.layer1, reference.layer2, reference.layer3,
                                                 reference.layer4)):
            x, y = stage(x), layer(y)
            assert torch.allclose(x, y, atol=1e-4)
    assert x.shape[-1] == 64 // 16                                    # the IR backbone's r/16 for the pyramid
    assert encoder(photo, reconstruction, torch.randn(1, 25)).shape == (1, NUM_WS, W_DIM)


def test_bad_weights_files_name_the_file_and_the_problem(tmp_path):
    encoder = resnet_encoder()
    with pytest.raises(BackboneWeightsError, match='not found: .*missing.pth'):
        encoder.load_backbone_weights(str(tmp_path / 'missing.pth'))
    imagenet_like_checkpoint(tmp_path / 'resnet18.pth', torchvision.models.resnet18)
    with pytest.raises(BackboneWeightsError, match=r'resnet18.pth: not a ResNet-34 checkpoint: \d+ tensors missing'):
        encoder.load_backbone_weights(str(tmp_path / 'resnet18.pth'))
    imagenet_like_checkpoint(tmp_path / 'resnet50.pth', torchvision.models.resnet50)
    with pytest.raises(BackboneWeightsError, match='resnet50.pth: not a ResNet-34 checkpoint'):
        encoder.load_backbone_weights(str(tmp_path / 'resnet50.pth'))
    torch.save(torch.zeros(3), tmp_path / 'tensor.pth')
    with pytest.raises(BackboneWeightsError, match='tensor.pth: not a torchvision ResNet state dict'):
        encoder.load_backbone_weights(str(tmp_path / 'tensor.pth'))
    (tmp_path / 'notes.pth').write_text('not weights')
    with pytest.raises(BackboneWeightsError, match='notes.pth: not a readable weights file'):
        encoder.load_backbone_weights(str(tmp_path / 'notes.pth'))
    with pytest.raises(ValueError, match='need backbone=resnet34'):
        W3DEncoder(EncoderConfig.for_generator(NUM_WS, W_DIM, 64)).load_backbone_weights(str(tmp_path / 'x.pth'))


def test_resnet34_config_checks_and_file_round_trip(tmp_path):
    with pytest.raises(ValueError, match='backbone must be one of ir, resnet34'):
        EncoderConfig(backbone='vgg')
    with pytest.raises(ValueError, match="ResNet-34's stages"):
        EncoderConfig(backbone='resnet34', stage_blocks=(2, 2, 3, 2))
    imagenet_like_checkpoint(tmp_path / 'resnet34.pth')
    encoder = resnet_encoder()
    encoder.load_backbone_weights(str(tmp_path / 'resnet34.pth'))
    with torch.no_grad():
        for head in encoder.heads:
            head.linear.weight.normal_(0, 0.05)
    G = build_tiny_generator(0)
    save(str(tmp_path / 'encoder.safetensors'), encoder, torch.randn(NUM_WS, W_DIM), G)
    loaded, _, _ = load(str(tmp_path / 'encoder.safetensors'), G)
    assert loaded.config.backbone == 'resnet34' and loaded.config == encoder.config
    photo, c = torch.rand(1, 3, 64, 64) * 2 - 1, torch.randn(1, 25)
    with torch.no_grad():
        assert torch.equal(loaded(photo, photo, c), encoder.eval()(photo, photo, c))
