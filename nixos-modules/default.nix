# The whole agent guest: the contract plus both agents.
{
  imports = [
    ./guest.nix
    ./opencode.nix
    ./llm.nix
  ];
}
