# The whole agent guest: the contract plus every agent.
{
  imports = [
    ./guest.nix
    ./opencode.nix
    ./claude.nix
    ./codex.nix
    ./llm.nix
  ];
}
