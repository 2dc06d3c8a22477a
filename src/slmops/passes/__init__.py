"""slmops' own Olive passes, registered through slmops.olive_config.package_config()."""
