from agentapi_proxy.cli import main

main()
