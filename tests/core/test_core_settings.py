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


def test_replace_changes_sections_without_mutating():
    base = Settings()
    changed = base.replace(data_dir=Path("/x"), dicom__port=2000)
    assert changed.dicom.port == 2000 and changed.data_dir == Path("/x")
    assert base.dicom.port == 11112
