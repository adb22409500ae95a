from corolla.cli import main

main()
