"""Guest images: the manifest contract, the micro builder and the NixOS flake."""
