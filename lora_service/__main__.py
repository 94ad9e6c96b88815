from lora_service.cli import main

main()
