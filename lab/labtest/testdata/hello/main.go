// Command hello is built by labtest's own test of GoBuild.
package main

import "fmt"

func main() { fmt.Println("hello from a labtest build") }
