"""Settings: defaults, TOML file, LEUK_FHIR_* environment, and precise errors."""

from pathlib import Path

import pytest

from leuk_fhir.errors import ConfigurationError
from leuk_fhir.settings import Settings, load_settings


def test_defaults_need_no_configuration():
    settings = load_settings(env={})
    assert settings == Settings()
    assert settings.dicom.port == 11112
    assert settings.fhir.base_url is None


def test_file_then_environment_precedence(tmp_path: Path):
    config = tmp_path / "leuk.toml"
    config.write_text(
        'data_dir = "/srv/leuk"\n'
        "[dicom]\nport = 104\nallowed_calling_aes = [\"SCOPE1\", \"SCANNER\"]\n"
        '[fhir]\nbase_url = "https://ehr.example/fhir"\nauth = "bearer"\n'
    )
    env = {"LEUK_FHIR_DICOM_PORT": "11113", "LEUK_FHIR_FHIR_TIMEOUT_S": "5.5"}
    settings = load_settings(config, env=env)
    assert settings.data_dir == Path("/srv/leuk")
    assert settings.dicom.port == 11113  # environment wins over the file
    assert settings.dicom.allowed_calling_aes == ("SCOPE1", "SCANNER")
    assert settings.fhir.base_url == "https://ehr.example/fhir"
    assert settings.fhir.timeout_s == 5.5


def test_config_file_named_by_environment(tmp_path: Path):
    config = tmp_path / "c.toml"
    config.write_text("[service]\nport = 9000\nrequire_auth = true\n")
    settings = load_settings(env={"LEUK_FHIR_CONFIG": str(config)})
    assert settings.service.port == 9000
    assert settings.service.require_auth is True


def test_environment_lists_booleans_and_none():
    settings = load_settings(
        env={
            "LEUK_FHIR_DICOM_ALLOWED_CALLING_AES": "A, B,,C",
            "LEUK_FHIR_DICOM_ENABLED": "off",
            "LEUK_FHIR_FHIR_BASE_URL": "",
        }
    )
    assert settings.dicom.allowed_calling_aes == ("A", "B", "C")
    assert settings.dicom.enabled is False
    assert settings.fhir.base_url is None


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"LEUK_FHIR_DICOM_PORT": "eleven"}, "LEUK_FHIR_DICOM_PORT"),
        ({"LEUK_FHIR_SERVICE_REQUIRE_AUTH": "maybe"}, "LEUK_FHIR_SERVICE_REQUIRE_AUTH"),
    ],
)
def test_invalid_environment_values_name_the_variable(env, fragment):
    with pytest.raises(ConfigurationError, match=fragment):
        load_settings(env=env)


def test_unknown_keys_and_bad_toml_are_rejected(tmp_path: Path):
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[dicom]\nprot = 104\n")
    with pytest.raises(ConfigurationError, match="prot"):
        load_settings(unknown, env={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[dicom\n")
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        load_settings(broken, env={})
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_settings(tmp_path / "missing.toml", env={})


def test_a_misspelt_environment_setting_is_refused_with_a_suggestion():
    with pytest.raises(ConfigurationError, match=r"LEUK_FHIR_FHIR_BASEURL \(did you mean "
                       r"LEUK_FHIR_FHIR_BASE_URL\?\)") as caught:
        load_settings(env={"LEUK_FHIR_FHIR_BASEURL": "https://ehr.example.org/fhir"})
    assert "LEUK_FHIR_<SECTION>_<FIELD>" in (caught.value.hint or "")
    with pytest.raises(ConfigurationError, match="LEUK_FHIR_DICOM_PROT"):
        load_settings(env={"LEUK_FHIR_DICOM_PROT": "104", "LEUK_FHIR_DICOM_PORT": "104"})
    # variables outside the settings' sections belong to other tools (the test harness)
    settings = load_settings(env={"LEUK_FHIR_TEST_FHIR_BASE": "x", "LEUK_FHIR_HAPI_CDS": "1",
                                  "LEUK_FHIR_DATA_DIR": "/tmp/leuk", "LEUK_FHIR_SHARED": "y"})
    assert settings.data_dir == Path("/tmp/leuk")


def test_replace_changes_sections_without_mutating():
    base = Settings()
    changed = base.replace(data_dir=Path("/x"), dicom__port=2000)
    assert changed.dicom.port == 2000 and changed.data_dir == Path("/x")
    assert base.dicom.port == 11112


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "leuk.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ('[service]\nport = "8000"\n', "service.port must be an integer"),
        ("[service]\nport = 1.5\n", "service.port must be an integer"),
        ("[service]\nport = true\n", "service.port must be an integer"),
        ("[service]\nport = -1\n", "service.port: must be at least 0"),
        ("[dicom]\nport = 70000\n", "dicom.port: must be at most 65535"),
        ('[service]\nrequire_auth = "yes"\n', "service.require_auth must be a boolean"),
        ("[fhir]\nbase_url = 5\n", "fhir.base_url must be a string"),
        ('[fhir]\nbase_url = "ehr.example/fhir"\n', "fhir.base_url: must be an http"),
        ("[fhir]\ntimeout_s = 0\n", "fhir.timeout_s: must be greater than 0"),
        ("[fhir]\ntimeout_s = -3.0\n", "fhir.timeout_s"),
        ("[fhir]\ntimeout_s = nan\n", "fhir.timeout_s"),
        ("[image]\nmax_pixels = 0\n", "image.max_pixels: must be at least 1"),
        ("[model]\nbatch_size = 0\n", "model.batch_size"),
        ('[fhir]\nauth = "kerberos"\n', "fhir.auth: must be one of"),
        ('[model]\ndevice = "tpu"\n', "model.device: must be one of"),
        ('[dicom]\nanalysis_unit = "series"\n', "dicom.analysis_unit"),
        ('[dicom]\nae_title = "A_TITLE_THAT_IS_TOO_LONG"\n', "dicom.ae_title"),
        ('[dicom]\nallowed_calling_aes = "A,B"\n', "dicom.allowed_calling_aes must be a list"),
        ("[outbox]\nmax_attempts = 0\n", "outbox.max_attempts"),
        ("[outbox]\nbackoff_initial_s = 10.0\nbackoff_max_s = 1.0\n", "backoff_max_s"),
        ("[service]\nworkers = 0\n", "service.workers"),
        ('data_dir = ""\n', "data_dir"),
    ],
)
def test_wrong_types_ranges_and_choices_in_the_file_name_the_key(tmp_path: Path, toml, fragment):
    with pytest.raises(ConfigurationError, match=fragment.replace(".", r"\.")):
        load_settings(_config(tmp_path, toml), env={})


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"LEUK_FHIR_DICOM_PORT": "70000"}, "LEUK_FHIR_DICOM_PORT: must be at most 65535"),
        ({"LEUK_FHIR_SERVICE_PORT": "-1"}, "LEUK_FHIR_SERVICE_PORT"),
        ({"LEUK_FHIR_FHIR_TIMEOUT_S": "0"}, "LEUK_FHIR_FHIR_TIMEOUT_S"),
        ({"LEUK_FHIR_FHIR_TIMEOUT_S": "inf"}, "LEUK_FHIR_FHIR_TIMEOUT_S"),
        ({"LEUK_FHIR_IMAGE_MAX_PIXELS": ""}, "LEUK_FHIR_IMAGE_MAX_PIXELS"),
        ({"LEUK_FHIR_MODEL_DEVICE": ""}, "LEUK_FHIR_MODEL_DEVICE"),
        ({"LEUK_FHIR_DATA_DIR": ""}, "LEUK_FHIR_DATA_DIR"),
        ({"LEUK_FHIR_FHIR_AUTH": "oauth"}, "LEUK_FHIR_FHIR_AUTH"),
        ({"LEUK_FHIR_DICOM_ENABLED": ""}, "LEUK_FHIR_DICOM_ENABLED"),
    ],
)
def test_bad_environment_values_are_rejected(env, fragment):
    with pytest.raises(ConfigurationError, match=fragment):
        load_settings(env=env)


def test_valid_edge_values_are_accepted(tmp_path: Path):
    config = _config(
        tmp_path,
        "[dicom]\nport = 0\n[service]\nport = 65535\nrate_limit_per_minute = 0\n"
        '[fhir]\ntimeout_s = 1\nauth = "SMART-backend"\n[model]\nthreads = 0\ndevice = "cuda:1"\n'
        "[image]\nmax_pixels = 1\n[outbox]\nbackoff_initial_s = 2\nbackoff_max_s = 2\n",
    )
    env = {"LEUK_FHIR_SERVICE_REQUIRE_AUTH": "yes", "LEUK_FHIR_DICOM_ENABLED": "1",
           "LEUK_FHIR_OUTBOX_MAX_ATTEMPTS": " 3 "}
    settings = load_settings(config, env=env)
    assert settings.dicom.port == 0 and settings.service.port == 65535
    assert settings.fhir.timeout_s == 1.0 and isinstance(settings.fhir.timeout_s, float)
    assert settings.model.device == "cuda:1" and settings.service.require_auth is True
    assert settings.outbox.max_attempts == 3 and settings.dicom.enabled is True
    for truthy in ("true", "yes", "1", "On"):
        assert load_settings(env={"LEUK_FHIR_SERVICE_REQUIRE_AUTH": truthy}).service.require_auth


def test_environment_overrides_an_invalid_file_value(tmp_path: Path):
    config = _config(tmp_path, "[dicom]\nport = 104\n")
    assert load_settings(config, env={"LEUK_FHIR_DICOM_PORT": "0"}).dicom.port == 0


def test_unknown_key_names_its_section_and_binary_file_is_a_configuration_error(tmp_path: Path):
    with pytest.raises(ConfigurationError, match=r"dicom\.prot"):
        load_settings(_config(tmp_path, "[dicom]\nprot = 104\n"), env={})
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00port")
    with pytest.raises(ConfigurationError, match="not UTF-8"):
        load_settings(binary, env={})
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_settings(tmp_path, env={})  # a directory
