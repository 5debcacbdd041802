"""Layout strings and config validation: clear errors that name the problem."""
import ml_collections
import pytest

from ascan_jax import config_validation as cv
from ascan_jax import tasks
from ascan_jax.models import layout
from configs import ascan_b, ascan_l, ascan_t
from tests import helpers


def test_parse_layout_stages():
  assert layout.parse_layout("C-CCCT-CCTT-CTTT") == ("C", "CCCT", "CCTT", "CTTT")
  assert layout.count_blocks(layout.parse_layout("C-CT")) == {"C": 2, "T": 1}


@pytest.mark.parametrize("text,fragment", [
    ("C-CCXT-CCTT-CTTT", "bad character 'X' at position 4"),
    ("C-CC T", "bad character ' ' at position 4"),
    ("C--CT", "stage 2 is empty"),
    ("C-CT-", "stage 3 is empty"),
])
def test_malformed_layout_names_the_problem(text, fragment):
  with pytest.raises(layout.LayoutError, match=fragment):
    layout.parse_layout(text)


def test_layout_stage_count_must_match_widths():
  with pytest.raises(layout.LayoutError, match="3 stages but 4"):
    layout.parse_layout("C-CT-TT", num_stages=4)


@pytest.mark.parametrize("module", [ascan_t, ascan_b, ascan_l])
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_shipped_configs_validate(module, arg):
  tasks.validate(module.get_config(arg), num_devices=8)


def test_unknown_key_is_named_with_a_suggestion():
  c = ascan_t.get_config()
  c.optim.weight_decy = 0.1
  with pytest.raises(cv.ConfigError, match=r"config\.optim\.weight_decy.*weight_decay"):
    tasks.validate(c)


def test_wrong_type_is_named():
  c = ascan_t.get_config()
  data = c.data.to_dict()
  data["image_size"] = "224"  # ml_collections blocks this per field; a replaced sub-dict is not.
  c.data = ml_collections.ConfigDict(data)
  with pytest.raises(cv.ConfigError, match=r"config\.data\.image_size = '224' has type str"):
    cv.check_keys_and_types(c, tasks.schema_for(c))


def test_batch_that_does_not_divide_over_devices():
  c = ascan_t.get_config()
  c.batch_size = 100
  with pytest.raises(cv.ConfigError, match=r"config\.batch_size: 100 .* 8 data-parallel"):
    tasks.validate(c, num_devices=8)


def test_mesh_that_does_not_cover_devices():
  c = ascan_t.get_config()
  c.mesh.shape = (3, 1, 1)
  with pytest.raises(cv.ConfigError, match=r"config\.mesh\.shape"):
    tasks.validate(c, num_devices=8)


def test_width_not_multiple_of_head_dim():
  c = ascan_t.get_config()
  c.model.widths = (64, 128, 250, 512)
  with pytest.raises(cv.ConfigError, match=r"config\.model\.widths: stage 3"):
    tasks.validate(c)


def test_main_rejects_unknown_override_before_writing(tmp_path):
  workdir = tmp_path / "run"
  proc = helpers.run_main("--config=configs/ascan_t.py:runlocal", f"--workdir={workdir}",
                          "--config.optim.peak_lrr=1.0", check=False, timeout=300)
  assert proc.returncode == 2
  assert "unknown config key 'config.optim.peak_lrr'" in proc.stderr
  assert "peak_lr" in proc.stderr
  assert not workdir.exists()


def test_main_rejects_impossible_value_before_writing(tmp_path):
  workdir = tmp_path / "run"
  proc = helpers.run_main("--config=configs/ascan_t.py:runlocal", f"--workdir={workdir}",
                          "--config.batch_size=100", devices=8, check=False, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "config.batch_size" in proc.stderr and "8 data-parallel" in proc.stderr
  assert not workdir.exists()


def test_main_rejects_bad_layout_naming_the_character(tmp_path):
  proc = helpers.run_main("--config=configs/ascan_t.py:runlocal", f"--workdir={tmp_path}/r",
                          "--config.model.layout=C-CCCT-CC?T-CTTT", check=False, timeout=300)
  assert proc.returncode == 2
  assert "bad character '?' at position 9" in proc.stderr
