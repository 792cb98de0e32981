from robust_transfer.cli import main

main()
