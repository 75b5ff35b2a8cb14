<#
.SYNOPSIS
  Installs `execution-worker bridge-serve` for ONE MetaTrader 5 terminal (one broker account)
  on this Windows host: secrets as ACL-protected files, a firewall rule open only to the
  workers, and either a service (NSSM) or a logon task that restarts it when it stops.
  The bridge listens on all addresses with mutual TLS 1.3: its certificate (-CertFile,
  -KeyFile), the CA of the workers' client certificates (-ClientCaFile), the client names it
  accepts (-AllowClient) and the CA's revocation list (-CrlFile), all from
  make-bridge-certs.sh. Without them bridge-serve refuses to start off loopback.

.DESCRIPTION
  Run once per terminal, in an elevated PowerShell, after the steps of README.md (Python,
  the wheel, the terminal installed and logged in once with AutoTrading on, certificates).

  -Mode Task (default): a scheduled task that starts at the logon of -User (the account the
    terminal runs under, with auto-logon) and restarts every minute if it stops. The bridge
    then lives in the same desktop session as the terminal, which the MetaTrader5 module
    needs to reach a terminal it did not start.
  -Mode Service: a Windows service via NSSM (nssm.exe on PATH or -Nssm), running as -User,
    restarted by NSSM and by the service recovery actions (sc.exe failure). The bridge
    starts the terminal itself (initialize(path)) in the service's session: no terminal
    window. Try it on the demo account first.

  Secrets are never passed on a command line: the bridge secret and the account password are
  prompted for (or read from -SecretFile / -PasswordFile) and written to files readable only
  by -User, SYSTEM and Administrators; the bridge reads them via MT5_BRIDGE_SECRET_FILE and
  MT5_PASSWORD_FILE. The bridge secret stays a second factor behind mutual TLS.

  -MetricsPort (default 9109) serves the bridge's Prometheus metrics (refusals by cause,
  calls and latency by function, connected clients). With -MetricsAddresses the port is
  opened to those addresses (Prometheus) only; without, it listens on 127.0.0.1.

.EXAMPLE
  .\install-bridge.ps1 -Name icm-demo-1 -TerminalPath 'C:\MT5\icm-demo-1\terminal64.exe' `
      -Login 5012345 -Server 'ICMarkets-Demo' -Port 18812 -User 'MT5HOST\mt5' `
      -CertFile C:\ProgramData\mt5-bridge\tls\mt5-win-01.pem `
      -KeyFile C:\ProgramData\mt5-bridge\tls\mt5-win-01.key `
      -ClientCaFile C:\ProgramData\mt5-bridge\tls\ca.pem `
      -CrlFile C:\ProgramData\mt5-bridge\tls\crl.pem `
      -AllowClient 'CN=worker-prod' `
      -WorkerAddresses 10.20.1.0/24 -MetricsAddresses 10.20.5.10
#>
[CmdletBinding()]
param(
  [Parameter(Mandatory)] [ValidatePattern('^[A-Za-z0-9_.-]{1,40}$')] [string] $Name,
  [Parameter(Mandatory)] [string] $TerminalPath,
  [Parameter(Mandatory)] [long] $Login,
  [Parameter(Mandatory)] [string] $Server,
  [Parameter(Mandatory)] [string] $User,
  [Parameter(Mandatory)] [string] $CertFile,
  [Parameter(Mandatory)] [string] $KeyFile,
  [Parameter(Mandatory)] [string] $ClientCaFile,
  [Parameter(Mandatory)] [ValidatePattern('^((CN=)|(DNS:)|(URI:)|(email:)|(IP:))?[^\s"]+$')] [string[]] $AllowClient,
  [Parameter(Mandatory)] [string[]] $WorkerAddresses,
  [string] $CrlFile,
  [ValidateRange(1024, 65535)] [int] $Port = 18812,
  [ValidateRange(1024, 65535)] [int] $MetricsPort = 9109,
  [string[]] $MetricsAddresses,
  [ValidateSet('Task', 'Service')] [string] $Mode = 'Task',
  [string] $BridgeExe = 'C:\mt5-bridge\venv\Scripts\execution-worker.exe',
  [string] $DataRoot = 'C:\ProgramData\mt5-bridge',
  [string] $SecretFile,
  [string] $PasswordFile,
  [string] $Nssm = 'nssm.exe'
)
$ErrorActionPreference = 'Stop'

function Assert-Admin {
  $principal = [Security.Principal.WindowsPrincipal] [Security.Principal.WindowsIdentity]::GetCurrent()
  if (-not $principal.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
    throw 'Run this script in an elevated PowerShell (Run as administrator).'
  }
}

# Only -User, SYSTEM and Administrators may read the file; inheritance removed.
function Protect-File([string] $Path) {
  & icacls.exe $Path /inheritance:r /grant:r "*S-1-5-18:F" "*S-1-5-32-544:F" "${User}:R" | Out-Null
  if ($LASTEXITCODE -ne 0) { throw "icacls failed on $Path" }
}

function Write-SecretFile([string] $Target, [string] $From, [string] $Prompt) {
  if ($From) {
    Copy-Item -LiteralPath $From -Destination $Target -Force
  } elseif (-not (Test-Path $Target)) {
    $secure = Read-Host -AsSecureString -Prompt $Prompt
    $plain = [Runtime.InteropServices.Marshal]::PtrToStringBSTR(
      [Runtime.InteropServices.Marshal]::SecureStringToBSTR($secure))
    if (-not $plain) { throw "$Prompt must not be empty" }
    [IO.File]::WriteAllText($Target, $plain, (New-Object Text.UTF8Encoding($false)))
    $plain = $null
  }
  Protect-File $Target
}

Assert-Admin
$required = @($BridgeExe, $TerminalPath, $CertFile, $KeyFile, $ClientCaFile)
if ($CrlFile) { $required += $CrlFile }
foreach ($path in $required) {
  if (-not (Test-Path -LiteralPath $path)) { throw "not found: $path" }
}

$dir = Join-Path $DataRoot $Name
New-Item -ItemType Directory -Force -Path $dir, (Join-Path $dir 'logs') | Out-Null
& icacls.exe $dir /inheritance:r /grant:r "*S-1-5-18:(OI)(CI)F" "*S-1-5-32-544:(OI)(CI)F" "${User}:(OI)(CI)M" | Out-Null
Protect-File $KeyFile

$secretPath = Join-Path $dir 'bridge.secret'
$passwordPath = Join-Path $dir 'mt5.password'
Write-SecretFile $secretPath $SecretFile 'Bridge shared secret (the workers'' MT5_BRIDGE_SECRET)'
Write-SecretFile $passwordPath $PasswordFile "Password of MT5 account $Login"

$metricsHost = if ($MetricsAddresses) { '0.0.0.0' } else { '127.0.0.1' }
$argumentList = @(
  'bridge-serve', '--host', '0.0.0.0', '--port', "$Port",
  '--terminal-path', "`"$TerminalPath`"", '--login', "$Login", '--server', "`"$Server`"",
  '--tls-cert', "`"$CertFile`"", '--tls-key', "`"$KeyFile`"",
  '--tls-client-ca', "`"$ClientCaFile`"",
  '--metrics-port', "$MetricsPort", '--metrics-host', $metricsHost
)
foreach ($client in $AllowClient) { $argumentList += @('--tls-allow', "`"$client`"") }
if ($CrlFile) { $argumentList += @('--tls-crl', "`"$CrlFile`"") }
else { Write-Warning 'no -CrlFile: a revoked worker certificate stays valid until it expires' }
$arguments = $argumentList -join ' '
$environment = [ordered]@{
  MT5_BRIDGE_SECRET_FILE = $secretPath
  MT5_PASSWORD_FILE      = $passwordPath
  LOG_FORMAT             = 'json'
}

# Firewall: the bridge port, from the workers only.
$ruleName = "mt5-bridge-$Name"
Get-NetFirewallRule -DisplayName $ruleName -ErrorAction SilentlyContinue | Remove-NetFirewallRule
New-NetFirewallRule -DisplayName $ruleName -Direction Inbound -Action Allow -Protocol TCP `
  -LocalPort $Port -RemoteAddress $WorkerAddresses -Profile Any | Out-Null
Write-Host "firewall: TCP $Port open to $($WorkerAddresses -join ', ') only"
$metricsRule = "mt5-bridge-$Name-metrics"
Get-NetFirewallRule -DisplayName $metricsRule -ErrorAction SilentlyContinue | Remove-NetFirewallRule
if ($MetricsAddresses) {
  New-NetFirewallRule -DisplayName $metricsRule -Direction Inbound -Action Allow -Protocol TCP `
    -LocalPort $MetricsPort -RemoteAddress $MetricsAddresses -Profile Any | Out-Null
  Write-Host "firewall: metrics TCP $MetricsPort open to $($MetricsAddresses -join ', ') only"
}

if ($Mode -eq 'Service') {
  $service = "mt5-bridge-$Name"
  if (Get-Service -Name $service -ErrorAction SilentlyContinue) {
    & $Nssm stop $service | Out-Null
    & $Nssm remove $service confirm | Out-Null
  }
  & $Nssm install $service $BridgeExe $arguments | Out-Null
  if ($LASTEXITCODE -ne 0) { throw "nssm install failed ($LASTEXITCODE)" }
  $extra = @($environment.GetEnumerator() | ForEach-Object { "$($_.Key)=$($_.Value)" })
  & $Nssm set $service AppEnvironmentExtra @extra | Out-Null
  & $Nssm set $service AppDirectory $dir | Out-Null
  & $Nssm set $service AppStdout (Join-Path $dir 'logs\bridge.log') | Out-Null
  & $Nssm set $service AppStderr (Join-Path $dir 'logs\bridge.log') | Out-Null
  & $Nssm set $service AppRotateFiles 1 | Out-Null
  & $Nssm set $service AppRotateBytes 10485760 | Out-Null
  & $Nssm set $service AppExit Default Restart | Out-Null
  & $Nssm set $service AppRestartDelay 5000 | Out-Null
  # SIGTERM-like stop: Ctrl-C first, so the bridge closes connections cleanly
  & $Nssm set $service AppStopMethodConsole 10000 | Out-Null
  & $Nssm set $service Start SERVICE_DELAYED_AUTO_START | Out-Null
  $credential = Get-Credential -UserName $User -Message "Windows password of $User (runs the service)"
  & $Nssm set $service ObjectName $User $credential.GetNetworkCredential().Password | Out-Null
  # Service recovery as a second line of defence if NSSM itself dies.
  & sc.exe failure $service reset= 86400 actions= restart/5000/restart/10000/restart/60000 | Out-Null
  & $Nssm start $service | Out-Null
  Write-Host "service $service installed and started (logs: $dir\logs)"
} else {
  $task = "mt5-bridge-$Name"
  # A wrapper sets the (non-secret) environment: file paths only, never values.
  $wrapper = Join-Path $dir 'run-bridge.cmd'
  $lines = @('@echo off')
  $lines += $environment.GetEnumerator() | ForEach-Object { "set `"$($_.Key)=$($_.Value)`"" }
  $lines += "`"$BridgeExe`" $arguments >> `"$dir\logs\bridge.log`" 2>&1"
  Set-Content -LiteralPath $wrapper -Value $lines -Encoding ASCII
  $action = New-ScheduledTaskAction -Execute 'cmd.exe' -Argument "/c `"$wrapper`"" -WorkingDirectory $dir
  $trigger = New-ScheduledTaskTrigger -AtLogOn -User $User
  $settings = New-ScheduledTaskSettingsSet -RestartCount 9999 -RestartInterval (New-TimeSpan -Minutes 1) `
    -ExecutionTimeLimit ([TimeSpan]::Zero) -MultipleInstances IgnoreNew -AllowStartIfOnBatteries `
    -DontStopIfGoingOnBatteries -StartWhenAvailable
  $principal = New-ScheduledTaskPrincipal -UserId $User -LogonType Interactive -RunLevel Limited
  Register-ScheduledTask -TaskName $task -Action $action -Trigger $trigger -Settings $settings `
    -Principal $principal -Force | Out-Null
  Write-Host "scheduled task $task registered: starts at $User's logon (logs: $dir\logs)"
  Write-Host "start it now (as $User): Start-ScheduledTask -TaskName $task"
}

Write-Host ''
Write-Host 'Session entry for the workers'' MT5_SESSIONS file:'
Write-Host '  [[sessions]]'
Write-Host "  id = `"$Name`""
Write-Host '  backend = "bridge"'
Write-Host "  address = `"$([Net.Dns]::GetHostName().ToLower()):$Port`"   # a name in the certificate"
Write-Host "  login = $Login"
Write-Host "  server = `"$Server`""
Write-Host '  tls_ca = "/etc/execution-worker/tls/ca.pem"'
Write-Host '  # the deployment''s client certificate (one of -AllowClient), or MT5_BRIDGE_TLS_CERT/_KEY:'
Write-Host '  tls_cert = "/etc/execution-worker/tls/client.pem"'
Write-Host '  tls_key = "/etc/execution-worker/tls/client.key"'
Write-Host '  tls_crl = "/etc/execution-worker/tls/crl.pem"'
Write-Host ''
Write-Host "Prometheus target (job mt5-bridge): $([Net.Dns]::GetHostName().ToLower()):$MetricsPort"
