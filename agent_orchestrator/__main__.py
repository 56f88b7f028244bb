from agent_orchestrator.cli import main

main()
